//! Unit tests of the handlers with a fake clock and predictable random bytes.
