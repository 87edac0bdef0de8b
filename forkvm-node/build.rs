//! Sets the linker flags a Node addon needs (node's symbols resolve when node loads it).
fn main() {
    napi_build::setup();
}
