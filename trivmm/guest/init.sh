#!/bin/busybox sh
# /init of trivmm's test-guest initramfs (busybox-static from Debian).
# Prints a marker the e2e tests and the benchmark wait for, with the CPU count the kernel
# brought up, then powers off -- or, with `trivmm.shell` on the kernel command line, gives
# an interactive busybox shell on the console first; with `trivmm.panic`, exits (the kernel
# then panics); with `trivmm.cmd=<base64url of a shell command>` (examples/ services), runs
# the command with busybox sh and prints its output (stdout and stderr) after a line
# `TRIVMM-CMD-BEGIN`, then `TRIVMM-CMD-END rc=<its exit status>` (on a line of its own when
# the output ends with a newline), before powering off.
# With `trivmm.vtshell` (a VM with a display: docs/display.md), an interactive shell on the
# first virtual terminal -- the one fbcon draws on the screen and the keyboard types into --
# after the marker `TRIVMM-VTSHELL-READY` on the serial console; /init goes on (powers off)
# when that shell exits.
# Applets are called through busybox: the initramfs carries no applet links, since making
# them costs seconds on a host that emulates guest kernel code.
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in /lib/modules/*.ko; do [ -e "$m" ] && $bb insmod "$m"; done
# A steady cursor on a framebuffer console (a VM with a display): fbcon redraws a blinking
# one five times a second, measured at ~20% of a host CPU where guest kernel code is
# emulated, and the redraw keeps the screen from ever being idle. No-op without fbcon.
[ -w /sys/class/graphics/fbcon/cursor_blink ] && echo 0 >/sys/class/graphics/fbcon/cursor_blink
echo "TRIVMM-INIT-OK cpus=$($bb grep -c ^processor /proc/cpuinfo) kernel=$($bb uname -r)"
if $bb grep -qw trivmm.panic /proc/cmdline; then
    # Tests of the pvpanic path: init exiting makes the kernel panic ("Attempted to kill
    # init!"), and a kernel with the pvpanic driver tells the VMM.
    echo "trivmm: /init exits on request; the kernel will panic"
    exit 1
fi
cmd=
set -f  # the command line's words are not globs
for arg in $($bb cat /proc/cmdline); do
    case "$arg" in trivmm.cmd=*) cmd=${arg#trivmm.cmd=} ;; esac
done
set +f
if [ -n "$cmd" ]; then
    $bb --install -s /bin
    # base64url -> base64: its two other letters, and the padding it leaves out
    cmd=$(echo "$cmd" | $bb tr _- /+)
    case $((${#cmd} % 4)) in 2) cmd="$cmd==" ;; 3) cmd="$cmd=" ;; esac
    echo TRIVMM-CMD-BEGIN
    if echo "$cmd" | $bb base64 -d >/tmp/trivmm-cmd.sh 2>/dev/null; then
        (cd / && PATH=/bin:/sbin:/usr/bin:/usr/sbin exec $bb sh /tmp/trivmm-cmd.sh) </dev/null 2>&1
        rc=$?
    else
        echo "trivmm: cannot decode trivmm.cmd="
        rc=126
    fi
    echo "TRIVMM-CMD-END rc=$rc"
fi
if $bb grep -qw trivmm.vtshell /proc/cmdline; then
    [ -e /bin/ls ] || $bb --install -s /bin  # (trivmm.cmd may have made the links)
    export PATH=/bin:/sbin:/usr/bin:/usr/sbin
    echo "TRIVMM-VTSHELL-READY on tty1"
    # setsid first: the new session's leader opens tty1, which becomes its controlling tty.
    $bb setsid $bb sh -c 'exec /bin/sh -i </dev/tty1 >/dev/tty1 2>&1'
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
