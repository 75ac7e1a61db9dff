#!/bin/sh
# /init of the husk guest (busybox sh): of initrd.img, or of root.img after
# root-initrd.img's loader mounted it. Mounts the API filesystems, loads
# the kernel modules listed in /etc/husk/modules (device drivers; the kernel asks
# /sbin/modprobe for a filesystem's module on its first mount), names the virtio-serial ports
# like udev would (/dev/virtio-ports/<name>), then runs the husk guest agent.
# When the agent exits (or is absent) the VM powers off; PID 1 never returns.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
# dist-packages named here, so the agent runs with -S: no site module to import
export PYTHONPATH=/usr/lib/husk:/usr/lib/python3/dist-packages PYTHONDONTWRITEBYTECODE=1

log() { read -r up _ < /proc/uptime; echo "husk-init: [$up] $*"; }

mount -t proc -o nosuid,nodev,noexec proc /proc
# booted from the root image, the loader has mounted /dev already
grep -q "^devtmpfs /dev " /proc/mounts ||
    mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev 2>/dev/null
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mkdir -p /dev/pts /dev/shm /dev/mqueue /dev/virtio-ports
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname -F /etc/hostname
log "init started"

kver=$(uname -r)
loaded=0
failed=""
while read -r mod; do
    [ -n "$mod" ] || continue
    name=${mod##*/}
    name=${name%.ko}
    # loaded by the root image's loader (virtio_pci and what it needs)
    [ -d "/sys/module/${name//-/_}" ] && continue
    if insmod "/lib/modules/$kver/$mod" 2>/dev/null; then
        loaded=$((loaded + 1))
    else
        failed="$failed ${mod##*/}"
    fi
done < /etc/husk/modules
log "modules loaded: $loaded${failed:+, failed:$failed}"

ip link set lo up

# virtio-serial ports appear shortly after virtio_console binds; give them a moment.
if [ -d /sys/bus/virtio/drivers/virtio_console ] &&
   ls /sys/bus/virtio/drivers/virtio_console | grep -q virtio; then
    i=0
    while [ -z "$(ls /sys/class/virtio-ports 2>/dev/null)" ] && [ $i -lt 100 ]; do
        sleep 0.01
        i=$((i + 1))
    done
fi
for port in /sys/class/virtio-ports/*; do
    [ -e "$port/name" ] || continue
    name=$(cat "$port/name")
    [ -n "$name" ] && ln -sf "../${port##*/}" "/dev/virtio-ports/$name"
done
log "virtio-ports: $(ls /dev/virtio-ports | tr '\n' ' ')"

if [ -f /usr/lib/husk/guest/agent/__main__.py ]; then
    # husk.importtime on the kernel command line: python -X importtime on the console
    case " $(cat /proc/cmdline) " in *" husk.importtime "*) export PYTHONPROFILEIMPORTTIME=1 ;; esac
    log "agent started"
    python3 -S -m guest.agent
    log "agent exited with status $?"
else
    log "agent missing: /usr/lib/husk/guest/agent/__main__.py is not in this image"
fi
log "powering off"
sync
poweroff -f
