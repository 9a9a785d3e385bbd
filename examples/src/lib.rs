//! Plain-socket example programs; see `src/bin`.
