//! Gives libioengine.so its soname (libioengine.so.<major>), so programs
//! link against the ABI version rather than a file name.

fn main() {
    let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libioengine.so.{major}");
    println!("cargo:rerun-if-changed=build.rs");
}
