//! The six services. Each owns its store and talks to the others only
//! through events; the API reaches it through its command channel.

pub mod common;
pub mod inventory;
pub mod notifications;
pub mod orders;
pub mod packing;
pub mod picking;
pub mod reconcile;
pub mod shipping;
