// Socket.IO 4 + @socket.io/redis-adapter, implementing the benchmark's two events the way
// thinws does: `subscribe` joins a room and acks; `message` broadcasts to the room (the
// sender included when it is a member) and acks.
// Usage: node server.js <port> <redis url>
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const [port, redisUrl] = process.argv.slice(2);
const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();
await Promise.all([pubClient.connect(), subClient.connect()]);

const httpServer = createServer();
const io = new Server(httpServer, { transports: ["websocket"], adapter: createAdapter(pubClient, subClient) });
io.on("connection", (socket) => {
  socket.on("subscribe", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack();
  });
  socket.on("message", (message, ack) => {
    io.to(message.room).emit("message", { room: message.room, from: socket.id, payload: message.payload });
    if (typeof ack === "function") ack();
  });
});
httpServer.listen(Number(port), "127.0.0.1", () => console.log(`socket.io peer on ${port}`));
