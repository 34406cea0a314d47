//! Gives libioengine.so its soname, so programs link against the ABI
//! version rather than a file name: libioengine.so.<major>, and while the
//! major version is 0 (any minor release may change the ABI)
//! libioengine.so.0.<minor>. CMakeLists.txt names it the same way.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap_or_else(|_| "0".into());
    let abi = if major == "0" { format!("0.{minor}") } else { major };
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libioengine.so.{abi}");
    println!("cargo:rerun-if-changed=build.rs");
}
