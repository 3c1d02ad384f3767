// A tiny HTTP app for build tests: answers every request on $PORT.
const http = require("http");

const port = Number(process.env.PORT || 8000);
http
  .createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8" });
    res.end("hello from node\n");
  })
  .listen(port, "0.0.0.0");
