//! vhost-user-blk backend over any `vhd::Disk`: synthetic disks.
