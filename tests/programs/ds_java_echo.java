// A Java TCP echo server as people write it: `new ServerSocket(PORT)`, which binds `::` with
// IPV6_V6ONLY off (dual-stack) where IPv6 is available. Prints `ADDR <getInetAddress()>
// <getLocalPort()>` once listening and, per connection, `CONN <peer ip> <peer port>
// <local ip> <local port>`. Java shows IPv4-mapped addresses as plain IPv4 (Inet4Address).
// Run as a single-file source program: `java ds_java_echo.java PORT`.
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.ServerSocket;
import java.net.Socket;

public class DsJavaEcho {
    public static void main(String[] args) throws IOException {
        ServerSocket server = new ServerSocket(Integer.parseInt(args[0]));
        System.out.println("ADDR " + server.getInetAddress().getHostAddress() + " " + server.getLocalPort());
        while (true) {
            Socket c = server.accept();
            new Thread(() -> echo(c)).start();
        }
    }

    static void echo(Socket c) {
        try (c) {
            System.out.println("CONN " + c.getInetAddress().getHostAddress() + " " + c.getPort() + " "
                    + c.getLocalAddress().getHostAddress() + " " + c.getLocalPort());
            InputStream in = c.getInputStream();
            OutputStream out = c.getOutputStream();
            byte[] buf = new byte[65536];
            int n;
            while ((n = in.read(buf)) > 0) {
                out.write(buf, 0, n);
            }
        } catch (IOException e) {
            System.out.println("ERROR " + e);
        }
    }
}
