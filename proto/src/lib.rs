//! libgcb control-plane protocol (placeholder; being written).
#![forbid(unsafe_code)]
