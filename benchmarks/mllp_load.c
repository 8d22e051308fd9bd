/* The MLLP benchmark's load generator (benchmarks/mllp.py compiles it with the machine's C compiler).

   mllp_load PORT SENDERS SECONDS TAG MESSAGES_FILE RESULT_FILE ACKED_FILE

   SENDERS stop-and-wait connections to 127.0.0.1:PORT, on one epoll loop: each sends a message, waits for its
   acknowledgment, sends the next, until SECONDS have passed. Every message is MESSAGES_FILE's template (three %s:
   the control id, an NHS number, a sequence number; then a NUL byte, then 10-digit NHS numbers back to back) made
   distinct by its control id TAG-<connection>-<n>. Writes RESULT_FILE (JSON: messages, seconds, per_s, p50_ms,
   p99_ms, not_aa, mismatched, closed, sender_cpu_us_per_msg and its user and system parts) and ACKED_FILE (the
   control id of every message acknowledged AA, one a line), which the benchmark compares with what the listener
   stored. An acknowledgment counts as AA only when its MSA says AA for the control id just sent; one that names
   another (`mismatched`) or a connection the listener closed (`closed`) makes the exit status 1.

   Why C: the senders share this 2-core machine with the listener; the Python senders spend 13-16 us of CPU per
   message, which the listener then does not have. The benchmark runs both and reports both. */

#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <arpa/inet.h>
#include <unistd.h>

#define BUF 65536
#define MSG_MAX 8192

typedef struct {
    int fd;
    long n;          /* messages sent on this connection */
    double t0;       /* when the one in flight was sent */
    char cid[64];    /* its control id */
    size_t have;     /* bytes of acknowledgment read so far */
    char buf[BUF];
    int done;
} conn_t;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static char *template_;
static long mismatched;
static char *numbers;
static size_t n_numbers;
static const char *tag;

static void die(const char *what) {
    perror(what);
    exit(2);
}

static void send_next(conn_t *c, int k) {
    char msg[MSG_MAX];
    char seq[32];
    char nhs[11];
    c->n++;
    snprintf(c->cid, sizeof c->cid, "%s-%d-%ld", tag, k, c->n);
    snprintf(seq, sizeof seq, "%ld", c->n);
    memcpy(nhs, numbers + 10 * (size_t)(c->n % (long)n_numbers), 10);
    nhs[10] = 0;
    msg[0] = 0x0b;
    int len = snprintf(msg + 1, MSG_MAX - 3, template_, c->cid, nhs, seq);
    if (len < 0 || len >= MSG_MAX - 3) {
        fprintf(stderr, "message template too long\n");
        exit(2);
    }
    msg[1 + len] = 0x1c;
    msg[2 + len] = 0x0d;
    size_t total = (size_t)len + 3, off = 0;
    c->t0 = now();
    while (off < total) {
        ssize_t w = send(c->fd, msg + off, total - off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            die("send");
        }
        off += (size_t)w;
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s PORT SENDERS SECONDS TAG MESSAGES_FILE RESULT_FILE ACKED_FILE\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), senders = atoi(argv[2]);
    double seconds = atof(argv[3]);
    tag = argv[4];
    FILE *mf = fopen(argv[5], "rb");
    if (!mf) die("messages file");
    fseek(mf, 0, SEEK_END);
    long size = ftell(mf);
    fseek(mf, 0, SEEK_SET);
    template_ = malloc((size_t)size + 1);
    if (fread(template_, 1, (size_t)size, mf) != (size_t)size) die("read messages file");
    fclose(mf);
    template_[size] = 0;
    size_t tlen = strlen(template_);
    if ((long)tlen >= size) {
        fprintf(stderr, "the messages file has no NUL byte after its template\n");
        return 2;
    }
    numbers = template_ + tlen + 1;
    n_numbers = ((size_t)size - tlen - 1) / 10;
    if (n_numbers == 0 || senders < 1) {
        fprintf(stderr, "no NHS numbers in the messages file, or no senders\n");
        return 2;
    }
    FILE *acked = fopen(argv[7], "w");
    if (!acked) die("acked file");

    size_t lat_cap = 1 << 20, lat_n = 0;
    double *lat = malloc(lat_cap * sizeof *lat);
    if (!lat) die("malloc");
    long not_aa = 0, closed = 0;
    conn_t *conns = calloc((size_t)senders, sizeof *conns);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    for (int k = 0; k < senders; k++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        conns[k].fd = fd;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (unsigned)k};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
    }
    double t_start = now(), deadline = t_start + seconds;
    for (int k = 0; k < senders; k++) send_next(&conns[k], k);
    int open_ = senders;
    struct epoll_event events[256];
    while (open_ > 0) {
        int n = epoll_wait(ep, events, 256, 10000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        if (n == 0) {
            fprintf(stderr, "no acknowledgment for 10 s: giving up\n");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            int k = (int)events[i].data.u32;
            conn_t *c = &conns[k];
            ssize_t r = recv(c->fd, c->buf + c->have, BUF - c->have, 0);
            if (r <= 0) {
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                fprintf(stderr, "connection %d closed by the listener\n", k);
                close(c->fd);
                c->done = 1;
                closed++;
                open_--;
                continue;
            }
            c->have += (size_t)r;
            /* one acknowledgment at a time (stop-and-wait): complete when it ends with 0x1c 0x0d */
            char *end = memmem(c->buf, c->have, "\x1c\x0d", 2);
            if (!end) {
                if (c->have == BUF) {
                    fprintf(stderr, "acknowledgment over %d bytes\n", BUF);
                    return 1;
                }
                continue;
            }
            double t = now();
            if (lat_n == lat_cap) {
                lat_cap *= 2;
                double *more = realloc(lat, lat_cap * sizeof *lat);
                if (!more) die("realloc");
                lat = more;
            }
            lat[lat_n++] = t - c->t0;
            /* MSA|<code>|<the control id just sent>, then CR or the next field */
            char *msa = memmem(c->buf, (size_t)(end - c->buf), "MSA|", 4);
            size_t cl = strlen(c->cid);
            int ours = 0, aa = 0;
            if (msa && (size_t)(end - msa) > 7 + cl) {
                char after = msa[7 + cl];
                ours = msa[6] == '|' && memcmp(msa + 7, c->cid, cl) == 0 && (after == '\r' || after == '|');
                aa = ours && memcmp(msa + 4, "AA", 2) == 0;
            }
            if (aa)
                fprintf(acked, "%s\n", c->cid);
            else if (ours)
                not_aa++;
            else
                mismatched++;
            c->have = 0;
            if (t < deadline) {
                send_next(c, k);
            } else {
                close(c->fd);
                c->done = 1;
                open_--;
            }
        }
    }
    double wall = now() - t_start;
    fclose(acked);
    qsort(lat, lat_n, sizeof *lat, cmp);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
    double cpu = user + sys;
    FILE *out = fopen(argv[6], "w");
    if (!out) die("result file");
    size_t p99 = (size_t)(lat_n * 0.99);
    if (p99 >= lat_n) p99 = lat_n ? lat_n - 1 : 0;
    fprintf(out,
            "{\"senders\": %d, \"messages\": %zu, \"seconds\": %.3f, \"per_s\": %.0f, \"p50_ms\": %.3f, "
            "\"p99_ms\": %.3f, \"not_aa\": %ld, \"mismatched\": %ld, \"closed\": %ld, "
            "\"sender_cpu_us_per_msg\": %.1f, \"sender_user_us_per_msg\": %.1f, \"sender_sys_us_per_msg\": %.1f}\n",
            senders, lat_n, wall, lat_n / wall, lat_n ? lat[lat_n / 2] * 1000 : 0.0, lat_n ? lat[p99] * 1000 : 0.0,
            not_aa, mismatched, closed, lat_n ? cpu / lat_n * 1e6 : 0.0, lat_n ? user / lat_n * 1e6 : 0.0,
            lat_n ? sys / lat_n * 1e6 : 0.0);
    fclose(out);
    return (mismatched || closed) ? 1 : 0;
}
