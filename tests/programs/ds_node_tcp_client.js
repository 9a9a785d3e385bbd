// A Node.js TCP client: net.connect(PORT, HOST), sends N random bytes, half-closes, reads the
// echo to EOF. Prints `LOCAL <localAddress> <localPort> <remoteAddress> <remotePort>` once
// connected, then `SENT <sha256> <n>` and `ECHO <sha256> <n>` of what came back.
const net = require("net");
const crypto = require("crypto");
const [host, port, n] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const sha = (b) => crypto.createHash("sha256").update(b).digest("hex");
const data = crypto.randomBytes(n);
const chunks = [];
const c = net.connect(port, host, () => {
  console.log(`LOCAL ${c.localAddress} ${c.localPort} ${c.remoteAddress} ${c.remotePort}`);
  c.end(data);
});
c.setTimeout(20000, () => {
  console.log("TIMEOUT");
  process.exit(2);
});
c.on("data", (d) => chunks.push(d));
c.on("end", () => {
  const got = Buffer.concat(chunks);
  console.log(`SENT ${sha(data)} ${n}`);
  console.log(`ECHO ${sha(got)} ${got.length}`);
  process.exit(0);
});
c.on("error", (e) => {
  console.log(`ERROR ${e.code}`);
  process.exit(1);
});
