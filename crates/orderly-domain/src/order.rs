//! Placeholder: filled in by the order work.
