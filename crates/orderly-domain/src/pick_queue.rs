//! Placeholder: filled in by the pick_queue work.
