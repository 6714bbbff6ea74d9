/* vm-relay: runs inside the test VM (tests/vm). nbd-client only speaks TCP
 * or Unix sockets, and the guest has no network: the host's NBD socket
 * reaches the guest as a virtio-serial port (/dev/vportNpM). This program
 * joins the two: it listens on a Unix socket, accepts ONE connection (the
 * one nbd-client makes, then hands to the kernel), and copies bytes both
 * ways between it and the port until either side closes.
 *
 *   vm-relay LISTEN_SOCKET PORT_DEVICE
 *
 * It opens the port and listens first, then goes to the background: when
 * the command returns 0, nbd-client can connect. Errors go to stderr (the
 * console) prefixed "vm-relay:". One process per direction, so that a
 * blocked write in one direction never stops the other (both sides have
 * bounded buffers: a single-threaded relay could deadlock under load).
 *
 * Built with gcc -static (the initramfs has no C library for it). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *prog = "vm-relay";

static void die(const char *what) {
  fprintf(stderr, "%s: %s: %s\n", prog, what, strerror(errno));
  _exit(1);
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Copies from -> to until EOF or an error; returns 0 on EOF. */
static int copy(int from, int to, const char *name) {
  static char buf[65536];
  for (;;) {
    ssize_t n = read(from, buf, sizeof buf);
    if (n == 0) return 0;
    if (n < 0) {
      if (errno == EINTR) continue;
      fprintf(stderr, "%s: %s: read: %s\n", prog, name, strerror(errno));
      return -1;
    }
    if (write_all(to, buf, (size_t)n) != 0) {
      fprintf(stderr, "%s: %s: write: %s\n", prog, name, strerror(errno));
      return -1;
    }
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s LISTEN_SOCKET PORT_DEVICE\n", prog);
    return 2;
  }
  const char *path = argv[1], *port_path = argv[2];

  int port = open(port_path, O_RDWR | O_CLOEXEC | O_NOCTTY);
  if (port < 0) die(port_path);

  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (strlen(path) >= sizeof sa.sun_path) {
    fprintf(stderr, "%s: socket path too long: %s\n", prog, path);
    return 1;
  }
  strcpy(sa.sun_path, path);
  int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (lfd < 0) die("socket");
  unlink(path);
  if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) != 0) die(path);
  if (listen(lfd, 1) != 0) die("listen");

  /* Listening: the caller may connect as soon as we return. */
  pid_t pid = fork();
  if (pid < 0) die("fork");
  if (pid > 0) _exit(0);
  setsid();

  int conn;
  do conn = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
  while (conn < 0 && errno == EINTR);
  if (conn < 0) die("accept");
  close(lfd);
  unlink(path);

  signal(SIGPIPE, SIG_IGN);
  pid_t child = fork();
  if (child < 0) die("fork");
  if (child == 0) {
    /* port -> socket (NBD replies). Ends with the parent. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int rc = copy(port, conn, "port to socket");
    shutdown(conn, SHUT_WR);
    _exit(rc == 0 ? 0 : 1);
  }
  /* socket -> port (NBD requests). The kernel closes the socket after
   * NBD_CMD_DISC (nbd-client -d): then stop both directions. */
  int rc = copy(conn, port, "socket to port");
  kill(child, SIGKILL);
  waitpid(child, NULL, 0);
  close(conn);
  close(port);
  return rc == 0 ? 0 : 1;
}
