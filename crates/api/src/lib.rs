//! Request and response types shared by the daemon and the CLI.
