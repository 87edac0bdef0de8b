//! Node.js bindings for forkvm (napi-rs): arrive with the bindings issue; empty until then.
