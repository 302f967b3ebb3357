/*
 * aura_proxy._relay_core: the relay's per-read step in C.
 *
 * RelayCore is the base of aura_proxy.relay.Relay.  Its dataReceived is what
 * the upstream connection calls with each read of body bytes: note the time,
 * rewrite the bytes (the SSE transform's feed), count them, and write them to
 * the client, straight to its socket when nothing is queued before them
 * (framed as an HTTP/1.1 chunk when the response is chunked), the rest, if
 * the kernel does not take it all, through the transport's write.  The
 * state lives in this object and is visible to Python under the names the
 * rest of Relay uses.  aura_proxy.relay._PyRelayCore is the reference;
 * tests/test_relay.py runs the same tests against both.
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

static PyObject *s_write, *s_sentLength, *s_dataBuffer, *s_tempDataBuffer, *s_connected,
    *s_writeDisconnected, *s_fileno;

typedef struct {
    PyObject_HEAD
    PyObject *seconds;        /* clock.seconds */
    PyObject *feed;           /* the transform's feed, or NULL */
    PyObject *request;        /* the client's twisted.web Request */
    PyObject *tcp;            /* its TCP connection when writes may go to its socket, or NULL */
    int fd;                   /* tcp's socket */
    PyObject *first_write_at; /* float, or NULL */
    double last_read;
    Py_ssize_t sent;
    char client_gone;
    char chunked;
    char beats;
    char at_boundary;
} RelayCore;

/* 1 if tcp has nothing queued and is open for writing, 0 if not, -1 on error. */
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

/* Write frame[sent:] through the transport (its queue, flushed when the socket drains). */
static int
write_rest(PyObject *tcp, const char *frame, Py_ssize_t len, Py_ssize_t sent)
{
    PyObject *rest = PyBytes_FromStringAndSize(frame + sent, len - sent);
    if (rest == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodOneArg(tcp, s_write, rest);
    Py_DECREF(rest);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* The body bytes data (n of them) to the client's socket, framed as the response needs. */
static int
write_direct(RelayCore *self, PyObject *data, Py_ssize_t n)
{
    PyObject *tcp = self->tcp;
    /* request.sentLength += n, as Request.write would count it. */
    PyObject *count = PyObject_GetAttr(self->request, s_sentLength);
    if (count == NULL)
        return -1;
    PyObject *n_obj = PyLong_FromSsize_t(n);
    PyObject *total = n_obj == NULL ? NULL : PyNumber_Add(count, n_obj);
    Py_DECREF(count);
    Py_XDECREF(n_obj);
    if (total == NULL)
        return -1;
    int rc = PyObject_SetAttr(self->request, s_sentLength, total);
    Py_DECREF(total);
    if (rc < 0)
        return -1;

    int direct = writable_now(tcp);
    if (direct < 0)
        return -1;
    const char *body = PyBytes_AS_STRING(data);
    if (!self->chunked) {
        Py_ssize_t sent = 0;
        if (direct) {
            sent = send(self->fd, body, n, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (sent < 0)
                sent = 0; /* EAGAIN; any other error the transport's write finds and reports */
            if (sent == n)
                return 0;
        }
        if (sent == 0) {
            PyObject *r = PyObject_CallMethodOneArg(tcp, s_write, data);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
            return 0;
        }
        return write_rest(tcp, body, n, sent);
    }
    char head[24];
    int hlen = snprintf(head, sizeof head, "%zx\r\n", n);
    Py_ssize_t len = hlen + n + 2;
    char small[STACK_FRAME];
    char *frame = small;
    PyObject *big = NULL;
    if (len > STACK_FRAME) {
        big = PyBytes_FromStringAndSize(NULL, len);
        if (big == NULL)
            return -1;
        frame = PyBytes_AS_STRING(big);
    }
    memcpy(frame, head, hlen);
    memcpy(frame + hlen, body, n);
    memcpy(frame + hlen + n, "\r\n", 2);
    Py_ssize_t sent = 0;
    if (direct) {
        sent = send(self->fd, frame, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0)
            sent = 0;
    }
    rc = 0;
    if (sent != len) {
        if (sent == 0 && big != NULL) {
            PyObject *r = PyObject_CallMethodOneArg(tcp, s_write, big);
            rc = r == NULL ? -1 : 0;
            Py_XDECREF(r);
        } else {
            rc = write_rest(tcp, frame, len, sent);
        }
    }
    Py_XDECREF(big);
    return rc;
}

static int
ends_block(PyObject *data)
{
    const char *s = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n >= 2 && ((s[n - 2] == '\n' && s[n - 1] == '\n') || (s[n - 2] == '\r' && s[n - 1] == '\r')))
        return 1;
    return n >= 4 && memcmp(s + n - 4, "\r\n\r\n", 4) == 0;
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
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    self->sent += n;
    if (self->tcp == NULL) {
        PyObject *r = PyObject_CallMethodOneArg(self->request, s_write, data);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    } else if (write_direct(self, data, n) < 0) {
        goto error;
    }
    if (self->beats)
        self->at_boundary = (char)ends_block(data);
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
OBJECT_SLOT(first_write_at)

static PyObject *
RelayCore_get_tcp(RelayCore *self, void *closure)
{
    PyObject *v = self->tcp ? self->tcp : Py_None;
    Py_INCREF(v);
    return v;
}

/*
 * Setting the TCP connection also notes its socket's file descriptor.  A
 * connection without one (already closed) is not written to directly: the
 * attribute reads None, and writes go through request.write.
 */
static int
RelayCore_set_tcp(RelayCore *self, PyObject *v, void *closure)
{
    Py_CLEAR(self->tcp);
    self->fd = -1;
    if (v == NULL || v == Py_None)
        return 0;
    PyObject *fd = PyObject_CallMethodNoArgs(v, s_fileno);
    long value = fd == NULL ? -1 : PyLong_AsLong(fd);
    Py_XDECREF(fd);
    if (value < 0) {
        PyErr_Clear();
        return 0;
    }
    Py_INCREF(v);
    self->tcp = v;
    self->fd = (int)value;
    return 0;
}

static PyGetSetDef RelayCore_getset[] = {
    {"_seconds", (getter)RelayCore_get_seconds, (setter)RelayCore_set_seconds, "The clock's seconds().", NULL},
    {"_feed", (getter)RelayCore_get_feed, (setter)RelayCore_set_feed, "The transform's feed, or None.", NULL},
    {"_request", (getter)RelayCore_get_request, (setter)RelayCore_set_request, "The client's request.", NULL},
    {"_tcp", (getter)RelayCore_get_tcp, (setter)RelayCore_set_tcp,
     "The client's TCP connection when body bytes may go straight to its socket, or None.", NULL},
    {"first_write_at", (getter)RelayCore_get_first_write_at, (setter)RelayCore_set_first_write_at,
     "Clock time of the first body write, or None.", NULL},
    {NULL},
};

static PyMemberDef RelayCore_members[] = {
    {"_last_read", T_DOUBLE, offsetof(RelayCore, last_read), 0, "Clock time of the last upstream read."},
    {"sent", T_PYSSIZET, offsetof(RelayCore, sent), 0, "Body bytes written to the client."},
    {"_client_gone", T_BOOL, offsetof(RelayCore, client_gone), 0, "The client went away."},
    {"_chunked", T_BOOL, offsetof(RelayCore, chunked), 0, "The client's response is chunked."},
    {"_beats", T_BOOL, offsetof(RelayCore, beats), 0, "Heartbeats are on."},
    {"_at_boundary", T_BOOL, offsetof(RelayCore, at_boundary), 0,
     "The last write ended an SSE block (a heartbeat may follow)."},
    {NULL},
};

static PyMethodDef RelayCore_methods[] = {
    {"dataReceived", (PyCFunction)RelayCore_dataReceived, METH_O,
     "dataReceived(data): relay one upstream read to the client."},
    {NULL},
};

static PyObject *
RelayCore_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RelayCore *self = (RelayCore *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->fd = -1;
        self->at_boundary = 1;
    }
    return (PyObject *)self;
}

static int
RelayCore_traverse(RelayCore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->seconds);
    Py_VISIT(self->feed);
    Py_VISIT(self->request);
    Py_VISIT(self->tcp);
    Py_VISIT(self->first_write_at);
    return 0;
}

static int
RelayCore_clear(RelayCore *self)
{
    Py_CLEAR(self->seconds);
    Py_CLEAR(self->feed);
    Py_CLEAR(self->request);
    Py_CLEAR(self->tcp);
    Py_CLEAR(self->first_write_at);
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
    .m_doc = "The relay's per-read step in C (see aura_proxy.relay).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__relay_core(void)
{
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_write, "write"}, {&s_sentLength, "sentLength"}, {&s_dataBuffer, "dataBuffer"},
        {&s_tempDataBuffer, "_tempDataBuffer"}, {&s_connected, "connected"},
        {&s_writeDisconnected, "_writeDisconnected"}, {&s_fileno, "fileno"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i].slot == NULL && (*names[i].slot = PyUnicode_InternFromString(names[i].name)) == NULL)
            return NULL;
    }
    if (PyType_Ready(&RelayCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RelayCoreType);
    if (PyModule_AddObject(m, "RelayCore", (PyObject *)&RelayCoreType) < 0) {
        Py_DECREF(&RelayCoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
