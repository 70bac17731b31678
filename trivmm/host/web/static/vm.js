// One VM: its state and actions, its serial console (xterm.js) and its display (noVNC),
// each reconnected when the VM (re)starts. window.trivmm exposes them to tests.
import {Terminal} from "/static/vendor/xterm/xterm.mjs";
import {FitAddon} from "/static/vendor/xterm/addon-fit.mjs";
import RFB from "/static/vendor/novnc/core/rfb.js";
import {api, followEvents, say, socketUrl} from "./common.js";

const name = decodeURIComponent(location.pathname.split("/")[2] || "");
const path = "/api/vms/" + encodeURIComponent(name);
document.getElementById("name").textContent = name;
document.title = `trivmm: ${name}`;

const term = new Terminal({convertEol: true, scrollback: 5000, fontSize: 14});
const fit = new FitAddon();
term.loadAddon(fit);
term.open(document.getElementById("terminal"));
fit.fit();
addEventListener("resize", () => fit.fit());
const encoder = new TextEncoder();
const state = {name, term, rfb: null, console: null, vm: null};
window.trivmm = state;

function connectConsole() {
  if (state.console && state.console.readyState <= WebSocket.OPEN) return;
  term.reset();
  const ws = new WebSocket(socketUrl(path + "/console"));
  ws.binaryType = "arraybuffer";
  ws.onmessage = (message) => term.write(new Uint8Array(message.data));
  ws.onclose = (close) => term.write(`\r\n[${close.reason || "console closed"}]\r\n`);
  state.console = ws;
}
term.onData((data) => {
  if (state.console && state.console.readyState === WebSocket.OPEN) state.console.send(encoder.encode(data));
});

function connectDisplay() {
  const status = document.getElementById("display-status");
  const hasDisplay = Boolean(state.vm && state.vm.display);
  document.getElementById("screen").hidden = !hasDisplay;
  if (!hasDisplay) { status.textContent = "(none configured)"; return; }
  if (state.rfb) return;
  const rfb = new RFB(document.getElementById("screen"), socketUrl(path + "/display"), {wsProtocols: ["binary"]});
  rfb.scaleViewport = true;
  rfb.addEventListener("connect", () => { status.textContent = "connected"; });
  rfb.addEventListener("disconnect", () => {
    status.textContent = "disconnected";
    if (state.rfb === rfb) state.rfb = null;
  });
  state.rfb = rfb;
}

function show(vm) {
  state.vm = vm;
  const label = document.getElementById("state");
  label.textContent = vm.state + (vm.last_exit && vm.state === "stopped" ? ` (${vm.last_exit})` : "");
  label.className = "state " + vm.state;
  const stopped = vm.state === "stopped" || vm.state === "crashed";
  for (const button of document.querySelectorAll(".actions button")) {
    button.disabled = button.dataset.action === "start" ? !stopped : stopped;
  }
  if (vm.state === "running" || vm.state === "paused") { connectConsole(); connectDisplay(); }
  else document.getElementById("screen").hidden = !vm.display;
}

followEvents(
  (vms) => {
    const vm = vms.find((v) => v.name === name);
    if (vm) show(vm); else say(`There is no VM named ${name}.`, true);
  },
  (event) => {
    if (event.vm !== name) return;
    if (event.kind === "undefined") say(`${name} was deleted.`, true);
    else if (event.summary) show(event.summary);
  },
  () => {},
);

for (const button of document.querySelectorAll(".actions button")) {
  button.addEventListener("click", async () => {
    const action = button.dataset.action;
    try {
      const vm = action === "force-stop" ? await api("POST", path + "/stop", {force: true})
                                         : await api("POST", `${path}/${action}`, {});
      show(vm);
      say(`${action} done`);
    } catch (error) {
      say(error.message, true);
    }
  });
}
