//! Engine-level vhdx tests: images this module creates, written and read back, a dirty
//! log replayed, and the checks of hostile structures.
