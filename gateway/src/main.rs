fn main() {
    println!("fedgate {}", env!("CARGO_PKG_VERSION"));
}
