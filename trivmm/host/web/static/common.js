// What the pages share: JSON requests with the session's CSRF token, the websocket URL,
// the live event feed, and the message line.
let csrf = null;

export async function api(method, path, body) {
  if (method !== "GET" && csrf === null) {
    const session = await fetch("/api/session", {credentials: "same-origin"});
    if (session.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
    csrf = (await session.json()).csrf;
  }
  const headers = {"Content-Type": "application/json"};
  if (csrf !== null) headers["X-CSRF-Token"] = csrf;
  const response = await fetch(path, {method, headers, credentials: "same-origin",
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  if (response.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); }
  const value = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(value.error || `${response.status} ${response.statusText}`);
  return value;
}

export function socketUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

export function say(text, isError = false) {
  const line = document.getElementById("message");
  line.textContent = text;
  line.classList.toggle("error", isError);
}

// Calls onList(vms) with the full list, then onEvent(event) for each event; reconnects.
export function followEvents(onList, onEvent, onStatus) {
  const ws = new WebSocket(socketUrl("/api/events"));
  ws.onopen = () => onStatus("live");
  ws.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.type === "list") onList(data.vms); else onEvent(data);
  };
  ws.onclose = () => {
    onStatus("disconnected, retrying…");
    setTimeout(() => followEvents(onList, onEvent, onStatus), 2000);
  };
}

export function formatBytes(n) {
  for (const [unit, size] of [["G", 1 << 30], ["M", 1 << 20], ["K", 1 << 10]]) {
    if (n >= size && n % size === 0) return `${n / size} ${unit}iB`;
  }
  return `${n} B`;
}

export async function logout() {
  await api("POST", "/logout");
  location.href = "/login";
}
