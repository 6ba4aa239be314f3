//! Persistent tap devices. The kernel makes taps only through `/dev/net/tun`'s
//! `TUNSETIFF` (rtnetlink's "tun" kind refuses to create them), so this is the one
//! ioctl in the crate; everything after creation (port, up, delete) is netlink.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

const TUN_DEVICE: &str = "/dev/net/tun";
// From <linux/if_tun.h>.
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the persistent tap `name` (single queue, no packet information), so
/// QEMU can attach to it later with `tap,ifname=NAME`. It stays when this
/// process's descriptor closes.
pub(crate) fn create_persistent(name: &str) -> io::Result<()> {
    let file = OpenOptions::new().read(true).write(true).open(TUN_DEVICE)?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    // The caller checked the name is shorter than IFNAMSIZ (crate::names).
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` a properly sized,
    // NUL-terminated `struct ifreq` that lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: same descriptor; TUNSETPERSIST takes an integer argument, not a pointer.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETPERSIST as _, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
