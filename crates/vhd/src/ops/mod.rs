//! Operations on disk files: create, info, check. Each is a library function;
//! long ones take a [`crate::Progress`].

pub mod check;
pub mod compact;
pub mod convert;
pub mod info;
pub mod live_merge;
pub mod merge;
pub mod partial;
pub mod resize;
pub mod set_parent;
