//! A small async QMP client.
