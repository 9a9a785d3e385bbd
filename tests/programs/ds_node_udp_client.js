// A Node.js UDP client on a `udp6` socket: sends COUNT random datagrams of SIZE bytes to
// HOST PORT, each retried (up to 10 times, 300 ms apart) until the same bytes come back
// from HOST:PORT. Prints `FROM <rinfo.address> <rinfo.port>` of the first echo and
// `ECHOED ok/count`.
const dgram = require("dgram");
const crypto = require("crypto");
const [host, port, count, size] = [
  process.argv[2],
  Number(process.argv[3]),
  Number(process.argv[4]),
  Number(process.argv[5]),
];
const s = dgram.createSocket("udp6");
let ok = 0;
let shown = false;
let want = null;
let resolve = null;
s.on("message", (msg, rinfo) => {
  if (!shown) {
    console.log(`FROM ${rinfo.address} ${rinfo.port}`);
    shown = true;
  }
  if (want && msg.equals(want) && rinfo.address === host && rinfo.port === port && resolve) {
    resolve(true);
  }
});
const once = (d) =>
  new Promise((r) => {
    resolve = r;
    s.send(d, port, host);
    setTimeout(() => r(false), 300);
  });
(async () => {
  for (let i = 0; i < count; i++) {
    want = crypto.randomBytes(size);
    for (let attempt = 0; attempt < 10; attempt++) {
      if (await once(want)) {
        ok++;
        break;
      }
    }
  }
  console.log(`ECHOED ${ok}/${count}`);
  s.close();
})();
