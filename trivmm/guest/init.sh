#!/bin/busybox sh
# /init of trivmm's test-guest initramfs (busybox-static from Debian).
# Prints a marker the e2e tests and the benchmark wait for, with the CPU count the kernel
# brought up, then powers off -- or, with `trivmm.shell` on the kernel command line, gives
# an interactive busybox shell on the console first.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in /lib/modules/*.ko; do [ -e "$m" ] && insmod "$m"; done
echo "TRIVMM-INIT-OK cpus=$(grep -c ^processor /proc/cpuinfo) kernel=$(uname -r)"
if grep -qw trivmm.shell /proc/cmdline; then
    setsid cttyhack sh -l
fi
# A kernel with ACPI powers the VM off through the FADT's sleep register; one without ACPI
# (the small test kernel) has no power-off path on x86, so it resets (i8042 pulse), which the
# VMM also takes as a clean end.
if [ -d /sys/firmware/acpi ]; then poweroff -f; else reboot -f; fi
