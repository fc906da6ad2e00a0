// Chat room client. Protocol: see app/README.md.
(function () {
  "use strict";

  var room = document.currentScript.dataset.room;
  var list = document.getElementById("messages");
  var form = document.getElementById("composer");
  var nicknameInput = document.getElementById("nickname");
  var bodyInput = document.getElementById("body");
  var statusLabel = document.getElementById("status");
  var notice = document.getElementById("notice");
  var outboxList = document.getElementById("outbox");

  var NICKNAME_KEY = "chat.nickname";
  var CLOSE_NOT_FOUND = 4004;
  var MAX_BACKOFF_MS = 30000;
  // Proxies close WebSockets that stay silent (Nginx after 60 s by default).
  var PING_INTERVAL_MS = 25000;

  var socket = null;
  var attempts = 0;
  var pingTimer = null;
  // Highest seq rendered with nothing missing below it (0: nothing seen yet).
  var lastSeq = 0;
  // Messages that arrived ahead of a gap, keyed by seq, rendered once it is filled.
  var waiting = new Map();
  // After a "behind" frame: the server skipped messages up to this seq, which
  // must come from history before anything newer is shown.
  var catchUpTo = 0;
  // Posts sent (or waiting to be) that the server has not answered yet, by
  // client_id, in the order they were typed. A post leaves it when its
  // message comes back (live or in history) or an error frame names it; after
  // a reconnect every one is sent again with the same client_id, and the
  // server answers a post it already stored with that message instead of a
  // second copy. So nothing typed is lost, even when a server dies in between.
  var outbox = new Map();

  nicknameInput.value = localStorage.getItem(NICKNAME_KEY) || "";
  nicknameInput.addEventListener("change", function () {
    localStorage.setItem(NICKNAME_KEY, nicknameInput.value.trim());
  });

  function setStatus(text) {
    statusLabel.textContent = text;
  }

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  function socketUrl() {
    var scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + "/ws/chat/" + encodeURIComponent(room) + "/";
  }

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function newClientId() {
    if (crypto && crypto.randomUUID) return crypto.randomUUID();
    // Older browsers: 128 random bits, as hex.
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  function postFrame(post) {
    return { type: "message", nickname: post.nickname, body: post.body, client_id: post.clientId };
  }

  function queuePost(nickname, body) {
    var post = { clientId: newClientId(), nickname: nickname, body: body, item: document.createElement("li") };
    post.item.className = "pending";
    post.item.textContent = nickname + " " + body + " (sending…)";
    outboxList.appendChild(post.item);
    outbox.set(post.clientId, post);
    return send(postFrame(post));
  }

  function unqueue(post) {
    outbox.delete(post.clientId);
    post.item.remove();
  }

  // The server refused this post (an error frame names it): it is not
  // stored. The text goes back into the input so it can be sent again; if
  // the input holds something newer, the post stays in view, marked.
  function refused(post, frame) {
    outbox.delete(post.clientId);
    if (bodyInput.value === "") {
      bodyInput.value = post.body;
      post.item.remove();
    } else {
      post.item.className = "failed";
      post.item.textContent = post.nickname + " " + post.body + " (not sent: " + frame.code + ")";
    }
    showNotice("Your message was not sent: " + frame.detail + " (" + frame.code + ")");
  }

  function requestSince(seq) {
    send({ type: "history", since: seq });
  }

  function render(message) {
    var item = document.createElement("li");
    var time = document.createElement("time");
    var nick = document.createElement("span");
    var body = document.createElement("span");
    time.dateTime = message.created;
    time.textContent = new Date(message.created).toLocaleTimeString();
    nick.className = "nick";
    nick.textContent = message.nickname;
    body.className = "body";
    // textContent, never innerHTML: bodies are untrusted text.
    body.textContent = message.body;
    item.append(time, " ", nick, " ", body);
    var atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(item);
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  // Returns true when a gap (a missing seq) is still open.
  function accept(message) {
    var post = message.client_id ? outbox.get(message.client_id) : undefined;
    if (post) unqueue(post);
    if (lastSeq === 0 && list.childElementCount === 0) {
      // First message this page sees: older history is not wanted.
      lastSeq = message.seq - 1;
    }
    if (message.seq <= lastSeq) return waiting.size > 0;
    waiting.set(message.seq, message);
    showInOrder();
    return waiting.size > 0;
  }

  // Shows what waited for the seq after lastSeq, as long as the next is there.
  function showInOrder() {
    while (waiting.has(lastSeq + 1)) {
      lastSeq += 1;
      render(waiting.get(lastSeq));
      waiting.delete(lastSeq);
    }
  }

  // True while something below a received or announced seq is still missing.
  function missing() {
    return waiting.size > 0 || lastSeq < catchUpTo;
  }

  // Live messages, alone or in a batch: ask for history when they show a gap,
  // unless a request is already on its way (its answer asks again if needed).
  function onLive(messages) {
    var before = missing();
    messages.forEach(accept);
    if (missing() && !before) requestSince(lastSeq);
  }

  function onHistory(messages, first) {
    var before = lastSeq;
    // Messages below `first` were pruned (the retention time): gone, not
    // missing. Skip over them, or the page would ask for them for ever.
    if (first && first > lastSeq + 1 && !(lastSeq === 0 && list.childElementCount === 0)) {
      lastSeq = first - 1;
      waiting.forEach(function (message, seq) { if (seq <= lastSeq) waiting.delete(seq); });
      showInOrder();
    }
    messages.forEach(accept);
    // Pages are capped by the server: keep asking while they make progress.
    if (missing() && lastSeq > before) requestSince(lastSeq);
  }

  function onBehind(frame) {
    // The server dropped frame.since+1 .. frame.until for this socket: fetch
    // them; newer live messages wait in `waiting` until they are shown.
    if (lastSeq === 0 && list.childElementCount === 0) lastSeq = frame.since;
    catchUpTo = Math.max(catchUpTo, frame.until);
    requestSince(lastSeq);
  }

  function onFrame(event) {
    var frame;
    try {
      frame = JSON.parse(event.data);
    } catch (error) {
      return;
    }
    if (frame.type === "message") {
      onLive([frame]);
    } else if (frame.type === "batch") {
      onLive(frame.messages);
    } else if (frame.type === "behind") {
      onBehind(frame);
    } else if (frame.type === "history") {
      onHistory(frame.messages, frame.first);
    } else if (frame.type === "error") {
      var post = frame.client_id ? outbox.get(frame.client_id) : undefined;
      if (post) refused(post, frame);
      else showNotice(frame.detail + " (" + frame.code + ")");
      if (frame.code === "rate_limited" && missing()) {
        setTimeout(function () { requestSince(lastSeq); }, 1000);
      }
    }
  }

  function scheduleReconnect() {
    // Full jitter: clients dropped together must not all come back together.
    var ceiling = Math.min(MAX_BACKOFF_MS, 500 * Math.pow(2, attempts));
    var delay = ceiling / 2 + Math.random() * ceiling / 2;
    attempts += 1;
    setStatus("reconnecting in " + Math.round(delay / 1000) + " s…");
    setTimeout(connect, delay);
  }

  function connect() {
    setStatus("connecting…");
    socket = new WebSocket(socketUrl());
    socket.addEventListener("open", function () {
      attempts = 0;
      setStatus("connected");
      showNotice("");
      // After a reconnect, fetch whatever was posted while we were away.
      if (lastSeq > 0) requestSince(lastSeq);
      // Posts not answered before the drop: the server may or may not have
      // stored them; their client_id makes sending them again safe.
      outbox.forEach(function (post) { send(postFrame(post)); });
      pingTimer = setInterval(function () { send({ type: "ping" }); }, PING_INTERVAL_MS);
    });
    socket.addEventListener("message", onFrame);
    socket.addEventListener("close", function (event) {
      clearInterval(pingTimer);
      if (event.code === CLOSE_NOT_FOUND) {
        setStatus("closed");
        showNotice("This room name is not valid.");
        return;
      }
      scheduleReconnect();
    });
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var nickname = nicknameInput.value.trim();
    localStorage.setItem(NICKNAME_KEY, nickname);
    var sent = queuePost(nickname, bodyInput.value);
    bodyInput.value = "";
    showNotice(sent ? "" : "Not connected; your message is sent once the connection is back.");
    bodyInput.focus();
  });

  connect();
})();
