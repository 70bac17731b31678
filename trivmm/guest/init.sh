#!/bin/busybox sh
# /init of trivmm's test-guest initramfs (busybox-static from Debian).
# Prints a marker the e2e tests and the benchmark wait for, with the CPU count the kernel
# brought up, then powers off -- or, with `trivmm.shell` on the kernel command line, gives
# an interactive busybox shell on the console first; with `trivmm.panic`, exits (the kernel
# then panics).
# Applets are called through busybox: the initramfs carries no applet links, since making
# them costs seconds on a host that emulates guest kernel code.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in /lib/modules/*.ko; do [ -e "$m" ] && $bb insmod "$m"; done
echo "TRIVMM-INIT-OK cpus=$($bb grep -c ^processor /proc/cpuinfo) kernel=$($bb uname -r)"
if $bb grep -qw trivmm.panic /proc/cmdline; then
    # Tests of the pvpanic path: init exiting makes the kernel panic ("Attempted to kill
    # init!"), and a kernel with the pvpanic driver tells the VMM.
    echo "trivmm: /init exits on request; the kernel will panic"
    exit 1
fi
if $bb grep -qw trivmm.shell /proc/cmdline; then
    $bb --install -s /bin
    export PATH=/bin:/sbin:/usr/bin:/usr/sbin
    $bb setsid $bb cttyhack $bb sh -l
fi
# A kernel with ACPI powers the VM off through the FADT's PM1a control register; one
# without ACPI (the small test kernel) has no power-off path on x86, so it resets (i8042
# pulse), which the VMM also takes as a clean end.
if [ -d /sys/firmware/acpi ]; then $bb poweroff -f; else $bb reboot -f; fi
