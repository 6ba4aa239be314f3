//! NBD (fixed newstyle) server over any `vhd::Disk`.
