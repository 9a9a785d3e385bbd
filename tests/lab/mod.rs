//! Network lab harness (placeholder; being written).
