//! Links libc: glibc's crt1 calls our `main`, and `memcpy`/`memset`/`abort` come from libc
//! (compiler_builtins does not export the mem* functions on linux-gnu).
fn main() {
    println!("cargo:rustc-link-arg-bins=-lc");
}
