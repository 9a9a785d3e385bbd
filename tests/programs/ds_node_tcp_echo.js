// A Node.js TCP echo server as people write it: createServer + listen(PORT) with no host, so
// Node binds `::` with IPV6_V6ONLY off (dual-stack). Prints `ADDR <server.address() JSON>`
// once listening and, per connection, `CONN <remoteAddress> <remotePort> <localAddress>
// <localPort>` (accept()'s peer and getsockname() of the accepted socket).
const net = require("net");
const port = Number(process.argv[2]);
const server = net.createServer((c) => {
  console.log(`CONN ${c.remoteAddress} ${c.remotePort} ${c.localAddress} ${c.localPort}`);
  c.on("error", (e) => console.log(`ERROR ${e.code}`));
  c.pipe(c);
});
server.listen(port, () => console.log("ADDR " + JSON.stringify(server.address())));
