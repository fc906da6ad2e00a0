// Runs chat/static/chat/room.js against a fake page and WebSocket.
// argv[2]: room.js; stdin: a JSON list of frames the server sends, in order.
// stdout: {"rendered": [bodies shown, in order], "sent": [frames the page sent]}.
"use strict";
const fs = require("fs");
const vm = require("vm");

function element() {
  return {
    value: "", hidden: false, textContent: "", childElementCount: 0, children: [],
    scrollHeight: 0, scrollTop: 0, clientHeight: 0, dataset: {},
    addEventListener() {},
    appendChild(child) { this.children.push(child); this.childElementCount += 1; },
    append(...parts) { this.parts = parts; },
    focus() {},
  };
}

const elements = {};
["messages", "composer", "nickname", "body", "status", "notice"].forEach((id) => {
  elements[id] = element();
});
const sent = [];
let socket = null;

class FakeWebSocket {
  constructor(url) { this.url = url; this.readyState = 1; this.listeners = {}; socket = this; }
  addEventListener(type, listener) { (this.listeners[type] = this.listeners[type] || []).push(listener); }
  send(data) { sent.push(JSON.parse(data)); }
  fire(type, event) { (this.listeners[type] || []).forEach((listener) => listener(event)); }
}
FakeWebSocket.OPEN = 1;

const context = {
  document: {
    currentScript: { dataset: { room: "lobby" } },
    getElementById: (id) => elements[id],
    createElement: () => element(),
  },
  location: { protocol: "http:", host: "localhost" },
  localStorage: { getItem: () => null, setItem() {} },
  WebSocket: FakeWebSocket,
  setInterval: () => 1, clearInterval() {}, setTimeout() {},
  Math, Date, JSON, Map, encodeURIComponent,
};
vm.runInNewContext(fs.readFileSync(process.argv[2], "utf8"), context);

const frames = JSON.parse(fs.readFileSync(0, "utf8"));
socket.fire("open", {});
frames.forEach((frame) => socket.fire("message", { data: JSON.stringify(frame) }));
// Each rendered item is: time, " ", nickname, " ", body.
const rendered = elements.messages.children.map((item) => item.parts[4].textContent);
process.stdout.write(JSON.stringify({ rendered, sent }));
