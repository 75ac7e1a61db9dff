#!/bin/sh
# /init of root-initrd.img, the small initramfs that boots the shared root image
# (busybox-static and a few modules, nothing else). It loads the drivers of the
# virtio-pmem device QEMU backs with root.img, mounts that erofs with DAX (the
# guest reads the host's page cache of the file: no copy in guest memory),
# puts a tmpfs overlay on it (the guest's own writes stay in its own memory) and
# hands over to the image's /init. Failing, it says why on the console and powers off.
export PATH=/bin
log() { read -r up _ < /proc/uptime; echo "husk-loader: [$up] $*"; }
fail() { log "$*"; poweroff -f; sleep 60; }

mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
kver=$(uname -r)
while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$kver/$mod" || fail "cannot load ${mod##*/}"
done < /etc/husk/root-modules

# the pmem namespace appears once nd_pmem binds the region virtio_pmem made
i=0
while [ ! -b /dev/pmem0 ]; do
    [ $i -lt 500 ] || fail "no root image: no /dev/pmem0 (QEMU needs a virtio-pmem device backed by root.img; an initramfs-only guest boots initrd.img)"
    sleep 0.01
    i=$((i + 1))
done
mkdir -p /image /rw /root
mount -t erofs -o ro,dax=always /dev/pmem0 /image ||
    fail "cannot mount the root image from /dev/pmem0 read-only with DAX"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/image,upperdir=/rw/upper,workdir=/rw/work overlay /root ||
    fail "cannot mount the overlay on the root image"
while read -r dev dir type opts _; do
    [ "$dev" = /dev/pmem0 ] && log "root image: $dev $type $opts"
done < /proc/mounts
mount --move /dev /root/dev
umount /proc /sys
exec switch_root /root /init
