/*
 * aura_proxy._relay_core: the client's wire after the response head, and the
 * relay's per-read step, in C.
 *
 * ClientWriter writes a response's body bytes to the client: framed as an
 * HTTP/1.1 chunk when the response is chunked, sent straight to the client's
 * socket when nothing is queued in its transport before them, the rest, if
 * the kernel does not take it all, through the transport's write (so bytes
 * are never reordered).  aura_proxy.site.GatewayRequest owns one per response
 * on the fast path; aura_proxy.client_wire._PyClientWriter is its reference.
 *
 * RelayCore is the base of aura_proxy.relay.Relay.  Its dataReceived is what
 * the upstream connection calls with each read of body bytes: note the time,
 * rewrite the bytes (the SSE transform's feed), count them, and hand them to
 * the request's ClientWriter, called here in C, or else to request.write.
 * Its state is visible to Python under the names the rest of Relay uses.
 * aura_proxy.relay._PyRelayCore is the reference; tests/test_relay.py and
 * tests/test_client_wire.py run the same tests against both.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

/* A chunk this small is framed on the stack and sent with one send(). */
#define STACK_FRAME 4096

static PyObject *s_write, *s_dataBuffer, *s_tempDataBuffer, *s_connected, *s_writeDisconnected,
    *s_fileno, *s_seq;

/* The most bucket bounds a stream's gap histogram may have (aura_proxy.metrics). */
#define MAX_GAP_BOUNDS 24

/* ---- ClientWriter ------------------------------------------------------- */

enum { WRITER_OPEN, WRITER_ENDED, WRITER_LOST };

typedef struct {
    PyObject_HEAD
    PyObject *tcp; /* the connection direct_send_transport() gave, or NULL once closed */
    int fd;        /* its socket, or -1: everything goes through tcp.write */
    char chunked;
    char state;
    Py_ssize_t sent;
} ClientWriter;

static PyTypeObject ClientWriterType;

/*
 * 1 if tcp has nothing queued and is open for writing, 0 if not, -1 on error.
 * The names are aura_proxy.twisted_internals.send_queue_empty's: that module
 * hands a writer a transport only once it has checked them on this Twisted.
 */
static int
writable_now(PyObject *tcp)
{
    PyObject *names[4] = {s_dataBuffer, s_tempDataBuffer, s_connected, s_writeDisconnected};
    int want[4] = {0, 0, 1, 0};
    for (int i = 0; i < 4; i++) {
        PyObject *v = PyObject_GetAttr(tcp, names[i]);
        if (v == NULL)
            return -1;
        int truth = PyObject_IsTrue(v);
        Py_DECREF(v);
        if (truth < 0)
            return -1;
        if (truth != want[i])
            return 0;
    }
    return 1;
}

static int
call_write(PyObject *tcp, PyObject *bytes)
{
    PyObject *r = PyObject_CallMethodOneArg(tcp, s_write, bytes);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Write frame[sent:] through the transport (its queue, flushed when the socket drains). */
static int
write_rest(PyObject *tcp, const char *frame, Py_ssize_t len, Py_ssize_t sent)
{
    PyObject *rest = PyBytes_FromStringAndSize(frame + sent, len - sent);
    if (rest == NULL)
        return -1;
    int rc = call_write(tcp, rest);
    Py_DECREF(rest);
    return rc;
}

/* send() what the kernel takes now; 0 when it takes nothing or refuses. */
static Py_ssize_t
send_now(int fd, const char *buf, Py_ssize_t len)
{
    Py_ssize_t sent = send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    /* EAGAIN; any other error the transport's write finds and reports. */
    return sent < 0 ? 0 : sent;
}

/* Frame and send the body bytes data; 0, or -1 with an exception set. */
static int
writer_write(ClientWriter *self, PyObject *data)
{
    if (self->state != WRITER_OPEN) {
        if (self->state == WRITER_LOST)
            return 0; /* the client is gone: dropped, as twisted.web's Request.write drops */
        PyErr_SetString(PyExc_RuntimeError, "ClientWriter.write called after the response was finished");
        return -1;
    }
    if (self->tcp == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ClientWriter: not initialised");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n == 0)
        return 0; /* an empty chunk would end the body */
    self->sent += n;
    /* A strong reference: tcp.write may run code that closes this writer. */
    PyObject *tcp = self->tcp;
    Py_INCREF(tcp);
    int direct = self->fd >= 0 ? writable_now(tcp) : 0;
    int rc = 0;
    if (direct < 0) {
        rc = -1;
        goto out;
    }
    const char *body = PyBytes_AS_STRING(data);
    if (!self->chunked) {
        Py_ssize_t sent = direct ? send_now(self->fd, body, n) : 0;
        if (sent == 0)
            rc = call_write(tcp, data);
        else if (sent != n)
            rc = write_rest(tcp, body, n, sent);
        goto out;
    }
    char head[24];
    int hlen = snprintf(head, sizeof head, "%zx\r\n", n);
    Py_ssize_t len = hlen + n + 2;
    char small[STACK_FRAME];
    char *frame = small;
    PyObject *big = NULL;
    if (len > STACK_FRAME) {
        big = PyBytes_FromStringAndSize(NULL, len);
        if (big == NULL) {
            rc = -1;
            goto out;
        }
        frame = PyBytes_AS_STRING(big);
    }
    memcpy(frame, head, hlen);
    memcpy(frame + hlen, body, n);
    memcpy(frame + hlen + n, "\r\n", 2);
    Py_ssize_t sent = direct ? send_now(self->fd, frame, len) : 0;
    if (sent != len) {
        if (sent == 0 && big != NULL)
            rc = call_write(tcp, big);
        else
            rc = write_rest(tcp, frame, len, sent);
    }
    Py_XDECREF(big);
out:
    Py_DECREF(tcp);
    return rc;
}

static PyObject *
ClientWriter_write(ClientWriter *self, PyObject *data)
{
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "ClientWriter.write wants bytes");
        return NULL;
    }
    if (writer_write(self, data) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void
writer_close(ClientWriter *self, char state)
{
    if (self->state == WRITER_OPEN)
        self->state = state;
    self->fd = -1;
    Py_CLEAR(self->tcp);
}

static PyObject *
ClientWriter_end(ClientWriter *self, PyObject *unused)
{
    writer_close(self, WRITER_ENDED);
    Py_RETURN_NONE;
}

static PyObject *
ClientWriter_lose(ClientWriter *self, PyObject *unused)
{
    writer_close(self, WRITER_LOST);
    Py_RETURN_NONE;
}

/*
 * ClientWriter(tcp, chunked).  tcp's socket is noted now; a connection that
 * has none any more (closed, or fileno fails) gets every write through
 * tcp.write, framed all the same.
 */
static int
ClientWriter_init(ClientWriter *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"tcp", "chunked", NULL};
    PyObject *tcp;
    int chunked;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Op", kwlist, &tcp, &chunked))
        return -1;
    PyObject *fd = PyObject_CallMethodNoArgs(tcp, s_fileno);
    long value = fd == NULL ? -1 : PyLong_AsLong(fd);
    Py_XDECREF(fd);
    if (value < 0 || value > INT_MAX) {
        PyErr_Clear();
        value = -1;
    }
    Py_INCREF(tcp);
    Py_XSETREF(self->tcp, tcp);
    self->fd = (int)value;
    self->chunked = (char)chunked;
    self->state = WRITER_OPEN;
    self->sent = 0;
    return 0;
}

static PyObject *
ClientWriter_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    ClientWriter *self = (ClientWriter *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->fd = -1;
        self->state = WRITER_OPEN;
    }
    return (PyObject *)self;
}

static PyObject *
ClientWriter_get_tcp(ClientWriter *self, void *closure)
{
    PyObject *v = self->tcp ? self->tcp : Py_None;
    Py_INCREF(v);
    return v;
}

static PyObject *
ClientWriter_get_open(ClientWriter *self, void *closure)
{
    return PyBool_FromLong(self->state == WRITER_OPEN);
}

static int
ClientWriter_traverse(ClientWriter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->tcp);
    return 0;
}

static int
ClientWriter_clear(ClientWriter *self)
{
    Py_CLEAR(self->tcp);
    return 0;
}

static void
ClientWriter_dealloc(ClientWriter *self)
{
    PyObject_GC_UnTrack(self);
    ClientWriter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef ClientWriter_getset[] = {
    {"tcp", (getter)ClientWriter_get_tcp, NULL, "The client's connection, or None once closed.", NULL},
    {"open", (getter)ClientWriter_get_open, NULL, "Whether body bytes may still be written.", NULL},
    {NULL},
};

static PyMemberDef ClientWriter_members[] = {
    {"sent", T_PYSSIZET, offsetof(ClientWriter, sent), READONLY, "Body bytes written (before framing)."},
    {"chunked", T_BOOL, offsetof(ClientWriter, chunked), READONLY, "Whether the body is sent in chunks."},
    {NULL},
};

static PyMethodDef ClientWriter_methods[] = {
    {"write", (PyCFunction)ClientWriter_write, METH_O, "write(data): body bytes to the client."},
    {"end", (PyCFunction)ClientWriter_end, METH_NOARGS,
     "end(): the response is finished; a later write raises RuntimeError."},
    {"lose", (PyCFunction)ClientWriter_lose, METH_NOARGS, "lose(): the client is gone; later writes are dropped."},
    {NULL},
};

static PyTypeObject ClientWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aura_proxy._relay_core.ClientWriter",
    .tp_doc = "ClientWriter(tcp, chunked): a response's body to the client (see aura_proxy.client_wire).",
    .tp_basicsize = sizeof(ClientWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = ClientWriter_new,
    .tp_init = (initproc)ClientWriter_init,
    .tp_dealloc = (destructor)ClientWriter_dealloc,
    .tp_traverse = (traverseproc)ClientWriter_traverse,
    .tp_clear = (inquiry)ClientWriter_clear,
    .tp_methods = ClientWriter_methods,
    .tp_members = ClientWriter_members,
    .tp_getset = ClientWriter_getset,
};

/* ---- RelayCore ---------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *seconds;        /* clock.seconds */
    PyObject *feed;           /* the transform's feed, or NULL */
    PyObject *request;        /* the client's twisted.web Request */
    PyObject *writer;         /* the request's client writer, or NULL: request.write */
    PyObject *first_write_at; /* float, or NULL */
    double last_read;
    Py_ssize_t sent;
    char client_gone;
    char beats;
    char at_boundary;
    /* Metering (aura_proxy.metrics), set up by _meter(); off: one test per read. */
    char metered;
    char stall_open;          /* the silence since last_event_at is counted already */
    PyObject *event_source;   /* whose .seq counts stamped events, or NULL: a write is an event */
    Py_ssize_t seen_seq;      /* event_source.seq at the last metered write */
    Py_ssize_t events_out;    /* events written to the client */
    double first_event_at;    /* -1: none yet */
    double last_event_at;
    double stall_after;
    double gap_sum;
    Py_ssize_t stalls;
    int n_bounds;
    double gap_bounds[MAX_GAP_BOUNDS];
    Py_ssize_t gap_counts[MAX_GAP_BOUNDS + 1]; /* per bucket (not cumulative); the last: +Inf */
} RelayCore;

static int
ends_block(PyObject *data)
{
    const char *s = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n >= 2 && ((s[n - 2] == '\n' && s[n - 1] == '\n') || (s[n - 2] == '\r' && s[n - 1] == '\r')))
        return 1;
    return n >= 4 && memcmp(s + n - 4, "\r\n\r\n", 4) == 0;
}

/*
 * After a write to the client at time t: count the events it delivered (the
 * stamper's seq moved on by k; without a stamper, the write is one event),
 * the gap since the previous event into its bucket (the other k - 1 events
 * of the same read had no gap: bucket 0), and a stall when that gap is over
 * stall_after and the timer has not counted this silence already.
 * Per read, never per event; 0, or -1 with an exception set.
 */
static int
meter_write(RelayCore *self, double t)
{
    Py_ssize_t k = 1;
    if (self->event_source != NULL) {
        PyObject *v = PyObject_GetAttr(self->event_source, s_seq);
        if (v == NULL)
            return -1;
        Py_ssize_t seq = PyLong_AsSsize_t(v);
        Py_DECREF(v);
        if (seq == -1 && PyErr_Occurred())
            return -1;
        k = seq - self->seen_seq;
        self->seen_seq = seq;
        if (k <= 0)
            return 0; /* a comment, a partial block's flush: no event */
    }
    if (self->events_out == 0) {
        self->first_event_at = t;
    } else {
        double gap = t - self->last_event_at;
        int i = 0;
        while (i < self->n_bounds && gap > self->gap_bounds[i])
            i++;
        self->gap_counts[i]++;
        self->gap_sum += gap;
        if (gap > self->stall_after && !self->stall_open)
            self->stalls++;
    }
    self->gap_counts[0] += k - 1;
    self->stall_open = 0;
    self->last_event_at = t;
    self->events_out += k;
    return 0;
}

static PyObject *
RelayCore_dataReceived(RelayCore *self, PyObject *data)
{
    if (self->seconds == NULL || self->request == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "RelayCore: _seconds and _request must be set first");
        return NULL;
    }
    if (!PyBytes_Check(data)) {
        PyErr_SetString(PyExc_TypeError, "dataReceived wants bytes");
        return NULL;
    }
    /* Nothing read: no bytes for the client (an empty chunk would end its body). */
    if (PyBytes_GET_SIZE(data) == 0)
        Py_RETURN_NONE;
    PyObject *now = PyObject_CallNoArgs(self->seconds);
    if (now == NULL)
        return NULL;
    double t = PyFloat_AsDouble(now);
    if (t == -1.0 && PyErr_Occurred()) {
        Py_DECREF(now);
        return NULL;
    }
    self->last_read = t;
    Py_INCREF(data);
    if (self->feed != NULL) {
        PyObject *out = PyObject_CallOneArg(self->feed, data);
        Py_DECREF(data);
        if (out == NULL)
            goto error_now;
        data = out;
        if (!PyBytes_Check(data)) {
            PyErr_SetString(PyExc_TypeError, "the transform's feed must return bytes");
            goto error;
        }
        if (PyBytes_GET_SIZE(data) == 0)
            goto done;
    }
    if (self->client_gone)
        goto done;
    if (self->first_write_at == NULL) {
        Py_INCREF(now);
        self->first_write_at = now;
    }
    self->sent += PyBytes_GET_SIZE(data);
    /* Strong references: the writes below may run code that replaces them. */
    PyObject *writer = self->writer ? self->writer : self->request;
    Py_INCREF(writer);
    int rc;
    if (Py_IS_TYPE(writer, &ClientWriterType))
        rc = writer_write((ClientWriter *)writer, data);
    else
        rc = call_write(writer, data); /* the Python writer, or request.write */
    Py_DECREF(writer);
    if (rc < 0)
        goto error;
    if (self->beats)
        self->at_boundary = (char)ends_block(data);
    if (self->metered && meter_write(self, t) < 0)
        goto error;
done:
    Py_DECREF(data);
    Py_DECREF(now);
    Py_RETURN_NONE;
error:
    Py_DECREF(data);
error_now:
    Py_DECREF(now);
    return NULL;
}

/* An object attribute that reads None for NULL and stores None as NULL. */
#define OBJECT_SLOT(field)                                                     \
    static PyObject *RelayCore_get_##field(RelayCore *self, void *closure)    \
    {                                                                          \
        PyObject *v = self->field ? self->field : Py_None;                     \
        Py_INCREF(v);                                                          \
        return v;                                                              \
    }                                                                          \
    static int RelayCore_set_##field(RelayCore *self, PyObject *v, void *c)    \
    {                                                                          \
        if (v == Py_None)                                                      \
            v = NULL;                                                          \
        Py_XINCREF(v);                                                         \
        Py_XSETREF(self->field, v);                                            \
        return 0;                                                              \
    }

OBJECT_SLOT(seconds)
OBJECT_SLOT(feed)
OBJECT_SLOT(request)
OBJECT_SLOT(writer)
OBJECT_SLOT(first_write_at)
OBJECT_SLOT(event_source)

/*
 * _meter(bounds, stall_after, event_source): start metering this stream:
 * gaps between events into buckets with the upper bounds given (ascending,
 * at most MAX_GAP_BOUNDS; the last bucket is +Inf), stalls over stall_after
 * seconds, events counted by event_source.seq (None: one per write).
 */
static PyObject *
RelayCore_meter(RelayCore *self, PyObject *args)
{
    PyObject *bounds, *source;
    double stall_after;
    if (!PyArg_ParseTuple(args, "O!dO", &PyTuple_Type, &bounds, &stall_after, &source))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(bounds);
    if (n > MAX_GAP_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "at most %d gap bounds", MAX_GAP_BOUNDS);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double b = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (b == -1.0 && PyErr_Occurred())
            return NULL;
        if (b < 0 || (i > 0 && b <= self->gap_bounds[i - 1])) {
            PyErr_SetString(PyExc_ValueError, "gap bounds must be ascending and not negative");
            return NULL;
        }
        self->gap_bounds[i] = b;
    }
    self->n_bounds = (int)n;
    memset(self->gap_counts, 0, sizeof self->gap_counts);
    self->gap_sum = 0.0;
    self->stall_after = stall_after;
    self->stalls = 0;
    self->stall_open = 0;
    self->events_out = 0;
    self->first_event_at = self->last_event_at = -1.0;
    self->seen_seq = 0;
    if (source != Py_None) {
        PyObject *v = PyObject_GetAttr(source, s_seq);
        if (v == NULL)
            return NULL;
        self->seen_seq = PyLong_AsSsize_t(v);
        Py_DECREF(v);
        if (self->seen_seq == -1 && PyErr_Occurred())
            return NULL;
    }
    if (RelayCore_set_event_source(self, source, NULL) < 0)
        return NULL;
    self->metered = 1;
    Py_RETURN_NONE;
}

/* _gap_counts(): the gap histogram's per-bucket counts, the +Inf bucket last. */
static PyObject *
RelayCore_gap_counts(RelayCore *self, PyObject *unused)
{
    PyObject *t = PyTuple_New(self->n_bounds + 1);
    if (t == NULL)
        return NULL;
    for (int i = 0; i <= self->n_bounds; i++) {
        PyObject *v = PyLong_FromSsize_t(self->gap_counts[i]);
        if (v == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyGetSetDef RelayCore_getset[] = {
    {"_seconds", (getter)RelayCore_get_seconds, (setter)RelayCore_set_seconds, "The clock's seconds().", NULL},
    {"_feed", (getter)RelayCore_get_feed, (setter)RelayCore_set_feed, "The transform's feed, or None.", NULL},
    {"_request", (getter)RelayCore_get_request, (setter)RelayCore_set_request, "The client's request.", NULL},
    {"_writer", (getter)RelayCore_get_writer, (setter)RelayCore_set_writer,
     "The request's client writer (aura_proxy.client_wire), or None: request.write.", NULL},
    {"first_write_at", (getter)RelayCore_get_first_write_at, (setter)RelayCore_set_first_write_at,
     "Clock time of the first body write, or None.", NULL},
    {"_event_source", (getter)RelayCore_get_event_source, (setter)RelayCore_set_event_source,
     "Whose seq counts stamped events when metered, or None: a write is an event.", NULL},
    {NULL},
};

static PyMemberDef RelayCore_members[] = {
    {"_last_read", T_DOUBLE, offsetof(RelayCore, last_read), 0, "Clock time of the last upstream read."},
    {"sent", T_PYSSIZET, offsetof(RelayCore, sent), 0, "Body bytes written to the client."},
    {"_client_gone", T_BOOL, offsetof(RelayCore, client_gone), 0, "The client went away."},
    {"_beats", T_BOOL, offsetof(RelayCore, beats), 0, "Heartbeats are on."},
    {"_at_boundary", T_BOOL, offsetof(RelayCore, at_boundary), 0,
     "The last write ended an SSE block (a heartbeat may follow)."},
    {"_metered", T_BOOL, offsetof(RelayCore, metered), 0, "Metering is on (set by _meter)."},
    {"_stall_open", T_BOOL, offsetof(RelayCore, stall_open), 0,
     "The silence since the last event is counted as a stall already."},
    {"_events_out", T_PYSSIZET, offsetof(RelayCore, events_out), 0, "Events written to the client."},
    {"_first_event_at", T_DOUBLE, offsetof(RelayCore, first_event_at), 0,
     "Clock time of the first event written to the client, or -1."},
    {"_last_event_at", T_DOUBLE, offsetof(RelayCore, last_event_at), 0,
     "Clock time of the last event written to the client, or -1."},
    {"_stall_after", T_DOUBLE, offsetof(RelayCore, stall_after), 0, "A gap over this is a stall."},
    {"_gap_sum", T_DOUBLE, offsetof(RelayCore, gap_sum), 0, "Sum of the gaps between events."},
    {"_stalls", T_PYSSIZET, offsetof(RelayCore, stalls), 0, "Gaps over stall_after."},
    {NULL},
};

static PyMethodDef RelayCore_methods[] = {
    {"dataReceived", (PyCFunction)RelayCore_dataReceived, METH_O,
     "dataReceived(data): relay one upstream read to the client."},
    {"_meter", (PyCFunction)RelayCore_meter, METH_VARARGS,
     "_meter(bounds, stall_after, event_source): count events, gaps and stalls from now on."},
    {"_gap_counts", (PyCFunction)RelayCore_gap_counts, METH_NOARGS,
     "_gap_counts(): the gap histogram's counts per bucket, +Inf last."},
    {NULL},
};

static PyObject *
RelayCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RelayCore *self = (RelayCore *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->at_boundary = 1;
        self->first_event_at = self->last_event_at = -1.0;
    }
    return (PyObject *)self;
}

static int
RelayCore_traverse(RelayCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->seconds);
    Py_VISIT(self->feed);
    Py_VISIT(self->request);
    Py_VISIT(self->writer);
    Py_VISIT(self->first_write_at);
    Py_VISIT(self->event_source);
    return 0;
}

static int
RelayCore_clear(RelayCore *self)
{
    Py_CLEAR(self->seconds);
    Py_CLEAR(self->feed);
    Py_CLEAR(self->request);
    Py_CLEAR(self->writer);
    Py_CLEAR(self->first_write_at);
    Py_CLEAR(self->event_source);
    return 0;
}

static void
RelayCore_dealloc(RelayCore *self)
{
    PyObject_GC_UnTrack(self);
    RelayCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject RelayCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aura_proxy._relay_core.RelayCore",
    .tp_doc = "The relay's per-read step (see aura_proxy.relay.Relay).",
    .tp_basicsize = sizeof(RelayCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_new = RelayCore_new,
    .tp_dealloc = (destructor)RelayCore_dealloc,
    .tp_traverse = (traverseproc)RelayCore_traverse,
    .tp_clear = (inquiry)RelayCore_clear,
    .tp_methods = RelayCore_methods,
    .tp_members = RelayCore_members,
    .tp_getset = RelayCore_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aura_proxy._relay_core",
    .m_doc = "The client writer and the relay's per-read step in C (see aura_proxy.client_wire, aura_proxy.relay).",
    .m_size = -1,
};

static int
add_type(PyObject *m, const char *name, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__relay_core(void)
{
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_write, "write"}, {&s_dataBuffer, "dataBuffer"}, {&s_tempDataBuffer, "_tempDataBuffer"},
        {&s_connected, "connected"}, {&s_writeDisconnected, "_writeDisconnected"}, {&s_fileno, "fileno"}, {&s_seq, "seq"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (add_type(m, "ClientWriter", &ClientWriterType) < 0 || add_type(m, "RelayCore", &RelayCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    /* The private Twisted transport attributes read here, for the Python side
     * to check against aura_proxy.twisted_internals (which probes them). */
    PyObject *constants = Py_BuildValue(
        "{s:(OOOO)}", "transport_attributes", s_dataBuffer, s_tempDataBuffer, s_connected, s_writeDisconnected);
    if (constants == NULL || PyModule_AddObject(m, "CONSTANTS", constants) < 0) {
        Py_XDECREF(constants);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
