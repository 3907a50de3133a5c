//! Placeholder: filled in by the allocation work.
