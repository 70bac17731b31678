// The VM list: rows kept live from /api/events, the actions, and the define form.
import {api, followEvents, formatBytes, logout, say} from "./common.js";

const body = document.querySelector("#vms tbody");
const rows = new Map(); // name -> <tr>
const ACTIONS = [["start", "Start"], ["stop", "Stop"], ["reset", "Reset"], ["delete", "Delete"]];

function cell(row, index, text) { row.cells[index].textContent = text; }

function newRow(name) {
  const row = document.createElement("tr");
  row.dataset.name = name;
  for (let i = 0; i < 7; i++) row.insertCell();
  const link = document.createElement("a");
  link.href = "/vm/" + encodeURIComponent(name);
  link.textContent = name;
  row.cells[0].append(link);
  for (const [action, label] of ACTIONS) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.action = action;
    button.textContent = label;
    row.cells[6].append(button);
  }
  return row;
}

function show(vm) {
  let row = rows.get(vm.name);
  if (row === undefined) {
    row = newRow(vm.name);
    rows.set(vm.name, row);
    const after = [...rows.keys()].sort().find((other) => other > vm.name);
    body.insertBefore(row, after === undefined ? null : rows.get(after));
  }
  row.dataset.state = vm.state;
  cell(row, 1, vm.state);
  row.cells[1].className = "state " + vm.state;
  cell(row, 2, vm.vcpus);
  cell(row, 3, formatBytes(vm.memory));
  cell(row, 4, vm.display ? `${vm.display[0]}×${vm.display[1]}` : "—");
  cell(row, 5, vm.last_exit || "");
  const stopped = vm.state === "stopped" || vm.state === "crashed";
  for (const button of row.cells[6].querySelectorAll("button")) {
    const action = button.dataset.action;
    button.disabled = (action === "start" || action === "delete") ? !stopped : stopped;
  }
  document.getElementById("empty").hidden = rows.size > 0;
}

function remove(name) {
  rows.get(name)?.remove();
  rows.delete(name);
  document.getElementById("empty").hidden = rows.size > 0;
}

followEvents(
  (vms) => { body.replaceChildren(); rows.clear(); vms.forEach(show); },
  (event) => {
    if (event.kind === "undefined") remove(event.vm);
    else if (event.summary) show(event.summary);
  },
  (status) => { document.getElementById("connection").textContent = status; },
);

body.addEventListener("click", async (click) => {
  const button = click.target.closest("button");
  if (!button) return;
  const name = button.closest("tr").dataset.name;
  const action = button.dataset.action;
  if (action === "delete" && !confirm(`Delete VM ${name}? Its definition is removed.`)) return;
  try {
    if (action === "delete") await api("DELETE", "/api/vms/" + encodeURIComponent(name));
    else await api("POST", `/api/vms/${encodeURIComponent(name)}/${action}`, {});
    say(`${name}: ${action} done`);
  } catch (error) {
    say(`${name}: ${error.message}`, true);
  }
});

document.getElementById("define").addEventListener("submit", async (submit) => {
  submit.preventDefault();
  const form = submit.target;
  try {
    const vm = await api("POST", "/api/vms", {name: form.elements["name"].value, options: form.elements["options"].value,
                                              autostart: form.elements["autostart"].checked});
    show(vm);
    say(`${vm.name} defined`);
    form.reset();
  } catch (error) {
    say(error.message, true);
  }
});

document.getElementById("logout").addEventListener("click", logout);
