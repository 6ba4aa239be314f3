//! Operations on disk files: create, info, check, merge, convert, compact,
//! resize, set-parent. Each is a library function taking a [`crate::Progress`].
