/* vsock_helper: the guest's side of trivmm's virtio-vsock end-to-end tests.
 *
 *   vsock_helper listen PORT
 *       Listen on AF_VSOCK port PORT (any CID), print "LISTENING PORT" once ready, accept one
 *       connection, send back every byte it receives in upper case until the peer stops
 *       sending (end of file), close, exit 0.
 *   vsock_helper connect CID PORT TEXT
 *       Connect to (CID, PORT), send TEXT, shut down the sending side, print everything
 *       that comes back until end of file (followed by a newline if it lacked one), exit 0.
 *
 * Exit status: 0 done, 1 a system call failed (perror says which), 2 bad arguments.
 * Built static (gcc -static -Os) so that it runs in a busybox initramfs with no libc.
 */
#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <linux/vm_sockets.h>

static int usage(void)
{
    fprintf(stderr, "usage: vsock_helper listen PORT\n"
                    "       vsock_helper connect CID PORT TEXT\n");
    return 2;
}

static int parse_u32(const char *text, unsigned int *out)
{
    char *end;
    unsigned long value;

    errno = 0;
    value = strtoul(text, &end, 10);
    if (errno || end == text || *end || value > UINT_MAX)
        return -1;
    *out = (unsigned int)value;
    return 0;
}

static int write_all(int fd, const char *data, size_t length)
{
    while (length) {
        ssize_t done = write(fd, data, length);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += done;
        length -= (size_t)done;
    }
    return 0;
}

static int do_listen(unsigned int port)
{
    struct sockaddr_vm addr;
    char buffer[4096];
    int server, client;

    server = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (server < 0) {
        perror("vsock_helper: socket");
        return 1;
    }
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = port;
    if (bind(server, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("vsock_helper: bind");
        return 1;
    }
    if (listen(server, 1) < 0) {
        perror("vsock_helper: listen");
        return 1;
    }
    printf("LISTENING %u\n", port);
    fflush(stdout);
    do
        client = accept(server, NULL, NULL);
    while (client < 0 && errno == EINTR);
    if (client < 0) {
        perror("vsock_helper: accept");
        return 1;
    }
    close(server);
    for (;;) {
        ssize_t got = read(client, buffer, sizeof(buffer));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            perror("vsock_helper: read");
            return 1;
        }
        if (got == 0)
            break;
        for (ssize_t i = 0; i < got; i++)
            buffer[i] = (char)toupper((unsigned char)buffer[i]);
        if (write_all(client, buffer, (size_t)got) < 0) {
            perror("vsock_helper: write");
            return 1;
        }
    }
    close(client);
    return 0;
}

static int do_connect(unsigned int cid, unsigned int port, const char *text)
{
    struct sockaddr_vm addr;
    char buffer[4096];
    char last = '\n';
    int fd;

    fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("vsock_helper: socket");
        return 1;
    }
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = cid;
    addr.svm_port = port;
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("vsock_helper: connect");
        return 1;
    }
    if (write_all(fd, text, strlen(text)) < 0) {
        perror("vsock_helper: write");
        return 1;
    }
    if (shutdown(fd, SHUT_WR) < 0) {
        perror("vsock_helper: shutdown");
        return 1;
    }
    for (;;) {
        ssize_t got = read(fd, buffer, sizeof(buffer));
        if (got < 0) {
            if (errno == EINTR)
                continue;
            perror("vsock_helper: read");
            return 1;
        }
        if (got == 0)
            break;
        if (write_all(STDOUT_FILENO, buffer, (size_t)got) < 0) {
            perror("vsock_helper: write stdout");
            return 1;
        }
        last = buffer[got - 1];
    }
    if (last != '\n' && write_all(STDOUT_FILENO, "\n", 1) < 0)
        return 1;
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    unsigned int cid, port;

    if (argc == 3 && strcmp(argv[1], "listen") == 0) {
        if (parse_u32(argv[2], &port) < 0)
            return usage();
        return do_listen(port);
    }
    if (argc == 5 && strcmp(argv[1], "connect") == 0) {
        if (parse_u32(argv[2], &cid) < 0 || parse_u32(argv[3], &port) < 0)
            return usage();
        return do_connect(cid, port, argv[4]);
    }
    return usage();
}
