#!/bin/sh
# Copies the web console's pinned JavaScript (package-lock.json) from npm into
# trivmm/host/web/static/vendor, with the licences. The result is checked in: the package
# needs no npm (and no CDN) at run time. Run after changing package.json:
#     npm install --package-lock-only --ignore-scripts && web/vendor.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out="$here/../trivmm/host/web/static/vendor"
cd "$here"
npm ci --ignore-scripts --no-audit --no-fund
rm -rf "$out"
mkdir -p "$out/xterm" "$out/novnc"
x=node_modules/@xterm
cp "$x/xterm/lib/xterm.mjs" "$x/xterm/css/xterm.css" "$x/xterm/LICENSE" "$out/xterm/"
cp "$x/addon-fit/lib/addon-fit.mjs" "$out/xterm/"
cp "$x/addon-fit/LICENSE" "$out/xterm/LICENSE.addon-fit"
n=node_modules/@novnc/novnc
cp -R "$n/core" "$n/vendor" "$n/LICENSE.txt" "$n/AUTHORS" "$out/novnc/"
mkdir -p "$out/novnc/docs"
cp "$n"/docs/LICENSE.* "$out/novnc/docs/"
# the versions shipped, for the record (and the test that checks the copy is current)
node -e '
const lock = require("./package-lock.json").packages;
const names = ["@xterm/xterm", "@xterm/addon-fit", "@novnc/novnc"];
const lines = names.map(n => `${n} ${lock["node_modules/" + n].version} ${lock["node_modules/" + n].integrity}`);
process.stdout.write(lines.join("\n") + "\n");' > "$out/VERSIONS"
echo "vendored into $out:"
cat "$out/VERSIONS"
