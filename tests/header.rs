//! include/ioengine.h must be exactly what cbindgen generates from src/ffi
//! now, and every public name in it must carry the ioe_/IOE_ prefix.
//! Regenerate with `IOENGINE_BLESS_HEADER=1 cargo test --test header`.

use std::path::Path;

fn generate() -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(root).join("cbindgen.toml")).expect("read cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_src(Path::new(root).join("src/ffi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen failed on the crate");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn committed_header_matches_cbindgen_output() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/ioengine.h");
    let generated = generate();
    if std::env::var_os("IOENGINE_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/ioengine.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/ioengine.h is out of date with src/ffi; run IOENGINE_BLESS_HEADER=1 cargo test --test header"
    );
}

#[test]
fn every_public_name_has_the_prefix() {
    let header = generate();
    let mut names = Vec::new();
    // Declarations start in column 0; struct fields and comments do not.
    let code_lines = header.lines().map(|l| l.split("//").next().unwrap_or("")).filter(|l| !l.trim().is_empty());
    for line in code_lines.filter(|l| !l.starts_with([' ', '\t', '/', '*', '#']) && !l.starts_with("extern \"C\"")) {
        if let Some(start) = line.find("(*") {
            // Function-pointer typedef: "typedef ret (*name)(args);".
            let rest = &line[start + 2..];
            names.push(rest[..rest.find(')').unwrap_or(0)].to_string());
        } else if let Some(open) = line.find('(') {
            // Function declaration: "<type> name(args".
            names.push(line[..open].split_whitespace().last().unwrap_or("").trim_start_matches('*').to_string());
        } else {
            // "typedef struct x x;", "typedef struct x {", "} x;"
            for word in line.split_whitespace() {
                let word = word.trim_end_matches(';');
                if !matches!(word, "typedef" | "struct" | "enum" | "union" | "{" | "}" | "") {
                    names.push(word.to_string());
                }
            }
        }
    }
    for line in header.lines().filter_map(|l| l.strip_prefix("#define ")) {
        names.push(line.split_whitespace().next().unwrap_or("").to_string());
    }
    names.retain(|n| !n.is_empty() && n != "IOENGINE_H" && n != "extern");
    assert!(names.len() > 20, "too few names parsed: {names:?}");
    for name in names {
        assert!(name.starts_with("ioe_") || name.starts_with("IOE_"), "public name without prefix: {name}");
    }
}
