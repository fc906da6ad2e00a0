// Runs chat/static/chat/room.js against a fake page and WebSocket.
// argv[2]: room.js; stdin: a JSON list of steps, in order: a frame the server
// sends, or {"page": ACTION} for what a person or the network does:
//   {"page": "submit", "body": TEXT}  types TEXT in the message input and sends it
//   {"page": "type", "body": TEXT}    types TEXT in the message input, not sending it
//   {"page": "drop"}                  the socket closes (1006)
//   {"page": "reconnect"}             the page's reconnect timer fires; the new socket opens
// The nickname is "me" (from localStorage).
// stdout: {"rendered": [bodies shown, in order], "sent": [frames the page sent, over
// every socket], "input": the message input's value, "notice": the notice's text,
// "outbox": [texts of the outbox's items]}.
"use strict";
const fs = require("fs");
const vm = require("vm");

function element() {
  return {
    value: "", hidden: false, textContent: "", className: "", childElementCount: 0, children: [],
    scrollHeight: 0, scrollTop: 0, clientHeight: 0, dataset: {}, listeners: {}, parent: null,
    addEventListener(type, listener) { this.listeners[type] = listener; },
    appendChild(child) { child.parent = this; this.children.push(child); this.childElementCount += 1; },
    remove() {
      if (!this.parent) return;
      this.parent.children = this.parent.children.filter((child) => child !== this);
      this.parent.childElementCount = this.parent.children.length;
      this.parent = null;
    },
    append(...parts) { this.parts = parts; },
    focus() {},
  };
}

const elements = {};
["messages", "outbox", "composer", "nickname", "body", "status", "notice"].forEach((id) => {
  elements[id] = element();
});
const sent = [];
let socket = null;
let timers = [];
let ids = 0;

class FakeWebSocket {
  constructor(url) { this.url = url; this.readyState = 0; this.listeners = {}; socket = this; }
  addEventListener(type, listener) { (this.listeners[type] = this.listeners[type] || []).push(listener); }
  send(data) { sent.push(JSON.parse(data)); }
  fire(type, event) { (this.listeners[type] || []).forEach((listener) => listener(event)); }
}
FakeWebSocket.OPEN = 1;

function open() {
  socket.readyState = 1;
  socket.fire("open", {});
}

const context = {
  document: {
    currentScript: { dataset: { room: "lobby" } },
    getElementById: (id) => elements[id],
    createElement: () => element(),
  },
  location: { protocol: "http:", host: "localhost" },
  localStorage: { getItem: () => "me", setItem() {} },
  WebSocket: FakeWebSocket,
  // Predictable ids: id-1, id-2, ...
  crypto: { randomUUID: () => `id-${++ids}` },
  setInterval: () => 1, clearInterval() {},
  setTimeout: (callback) => { timers.push(callback); return timers.length; },
  Math, Date, JSON, Map, Uint8Array, Array, encodeURIComponent,
};
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), context);

const steps = JSON.parse(fs.readFileSync(0, "utf8"));
open();
steps.forEach((step) => {
  if (step.page === "submit") {
    elements.body.value = step.body;
    elements.composer.listeners.submit({ preventDefault() {} });
  } else if (step.page === "type") {
    elements.body.value = step.body;
  } else if (step.page === "drop") {
    socket.readyState = 3;
    socket.fire("close", { code: 1006 });
  } else if (step.page === "reconnect") {
    const due = timers;
    timers = [];
    due.forEach((callback) => callback());
    open();
  } else {
    socket.fire("message", { data: JSON.stringify(step) });
  }
});
// Each rendered item is: time, " ", nickname, " ", body.
const rendered = elements.messages.children.map((item) => item.parts[4].textContent);
process.stdout.write(JSON.stringify({
  rendered, sent, input: elements.body.value, notice: elements.notice.textContent,
  outbox: elements.outbox.children.map((item) => item.textContent),
}));
