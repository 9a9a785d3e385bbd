// A Node.js UDP echo server: dgram.createSocket('udp6') bound to PORT with no address (`::`,
// dual-stack). Prints `ADDR <socket.address() JSON>` once bound and, per datagram,
// `FROM <rinfo.address> <rinfo.port> <length> <sha256>`; sends each datagram back to its
// sender.
const dgram = require("dgram");
const crypto = require("crypto");
const port = Number(process.argv[2]);
const s = dgram.createSocket("udp6");
s.on("message", (msg, rinfo) => {
  const h = crypto.createHash("sha256").update(msg).digest("hex");
  console.log(`FROM ${rinfo.address} ${rinfo.port} ${msg.length} ${h}`);
  s.send(msg, rinfo.port, rinfo.address);
});
s.on("error", (e) => console.log(`ERROR ${e.code}`));
s.bind(port, () => console.log("ADDR " + JSON.stringify(s.address())));
