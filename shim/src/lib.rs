//! libgcb.so (placeholder; being written).
