/*
 * aura_proxy._chunked_read: an upstream connection's socket read, with the
 * common case of a chunked response body decoded in C.
 *
 * ChunkedReader.do_read replaces the TCP transport's doRead for upstream
 * connections (aura_proxy/fastclient.py).  It reads the socket; when the
 * connection is reading a chunked body, at a chunk boundary, and the read
 * is whole chunks (each "<hex>\r\n<data>\r\n", none the last one), it hands
 * their data straight to the body's consumer (the connection's _deliver).
 * Anything else (the response head, a chunk split across reads, a chunk
 * extension, the last chunk, another body framing) goes, unchanged, to the
 * connection's dataReceived: the Python parser stays the reference, and
 * tests/test_chunked_read.py checks both deliver the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>

/*
 * Values shared with aura_proxy/fastclient.py, which defines them: the module
 * exports them as CONSTANTS and fastclient does not use this module unless
 * they equal its own (a stale build then reads in Python, and says so).
 */
/* fastclient._M_CHUNKED */
#define MODE_CHUNKED 0
/* Reads are at most this large (fastclient._C_READ_BUFFER; Twisted's bufferSize for TCP). */
#define MAX_READ 65536
/* fastclient._MAX_CHUNK_SIZE: larger sizes are broken framing (the Python parser says so). */
#define MAX_CHUNK_SIZE 0xFFFFFFFFFFFFFFFLL
/* The fastclient._Connection attributes read and called here (CONNECTION_ATTRIBUTES). */
#define A_MODE "_mode"
#define A_BUF "_buf"
#define A_LEFT "_left"
#define A_DELIVER "_deliver"
#define A_DATA_RECEIVED "dataReceived"
#define A_FAILED "_delivery_failed"

/* Chunk-size lines longer than this are left to Python. */
#define MAX_HEX 8
/* At most this many chunks in one read are decoded here. */
#define MAX_CHUNKS 64

/* Every size decoded here is one the Python parser accepts too: larger ones go to it and it refuses them. */
_Static_assert(MAX_HEX < 16 && ((1ULL << (4 * MAX_HEX)) - 1) <= (unsigned long long)MAX_CHUNK_SIZE,
               "chunk sizes decoded in C must not exceed MAX_CHUNK_SIZE");

/* One read's bytes.  No Python code runs between the recv into it and the copy out of it. */
static char read_buffer[MAX_READ];

static PyObject *s_mode, *s_buf, *s_left, *s_deliver, *s_dataReceived, *s_fileno, *s_failed;

typedef struct {
    PyObject_HEAD
    PyObject *sock;   /* the socket object; NULL until __init__ */
    PyObject *conn;   /* the fastclient._Connection */
    PyObject *done;   /* what doRead returns at end of stream */
    PyObject *lost;   /* ... and on a socket error */
    Py_ssize_t size;  /* bytes per read */
} Reader;

static int
hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/*
 * 1 if the connection's attribute `name` is the int `expected`, else 0; -1 on
 * error.  Any int is fine (one beyond a C long long is simply not `expected`).
 */
static int
attr_is_int(PyObject *conn, PyObject *name, long long expected)
{
    PyObject *v = PyObject_GetAttr(conn, name);
    if (v == NULL)
        return -1;
    int overflow = 0;
    long long x = PyLong_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : expected - 1;
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    return !overflow && x == expected;
}

/*
 * 1, and *deliver a new reference to the body's consumer, if the connection
 * is at a chunk boundary of a chunked body being delivered; 0 if not; -1 on
 * error.
 */
static int
at_chunk_boundary(PyObject *conn, PyObject **deliver)
{
    int ok = attr_is_int(conn, s_mode, MODE_CHUNKED);
    if (ok > 0)
        ok = attr_is_int(conn, s_left, 0);
    if (ok > 0) {
        PyObject *pending = PyObject_GetAttr(conn, s_buf);
        if (pending == NULL)
            return -1;
        ok = PyBytes_Check(pending) && PyBytes_GET_SIZE(pending) == 0;
        Py_DECREF(pending);
    }
    if (ok > 0) {
        PyObject *d = PyObject_GetAttr(conn, s_deliver);
        if (d == NULL)
            return -1;
        if (d == Py_None) {
            Py_DECREF(d);
            return 0;
        }
        *deliver = d;
    }
    return ok;
}

/* Hand the pending exception to conn._delivery_failed, as the Python parser breaks the connection. */
static PyObject *
report_failure(PyObject *conn)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL && exc != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyObject *r = PyObject_CallMethodOneArg(conn, s_failed, exc ? exc : Py_None);
    Py_XDECREF(exc);
    return r;
}

/*
 * Find the chunks of buf[0:n] if it is whole non-last chunks only: their
 * starts and sizes, and the total data size.  Returns the chunk count, or 0
 * if the read is anything else.
 */
static int
whole_chunks(const char *buf, Py_ssize_t n, Py_ssize_t *starts, Py_ssize_t *sizes, Py_ssize_t *total)
{
    Py_ssize_t pos = 0, sum = 0;
    int count = 0;
    while (pos < n) {
        if (count == MAX_CHUNKS)
            return 0;
        Py_ssize_t size = 0, i = pos;
        while (i < n && i - pos < MAX_HEX) {
            int h = hexval(buf[i]);
            if (h < 0)
                break;
            size = size * 16 + h;
            i++;
        }
        if (i == pos || size == 0 || i + 1 >= n || buf[i] != '\r' || buf[i + 1] != '\n')
            return 0;
        Py_ssize_t start = i + 2;
        if (size > n - start - 2 || buf[start + size] != '\r' || buf[start + size + 1] != '\n')
            return 0;
        starts[count] = start;
        sizes[count] = size;
        count++;
        sum += size;
        pos = start + size + 2;
    }
    *total = sum;
    return count;
}

/*
 * Read the socket once.  The connection's state is read first: an error
 * there leaves the bytes in the socket.  Once bytes are taken, they reach the
 * connection (dataReceived, the consumer, or _delivery_failed if they cannot
 * be handed over); only the connection's own methods can still raise, as in
 * the Python form of doRead.
 */
static PyObject *
Reader_do_read(Reader *self, PyObject *unused)
{
    if (self->sock == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "ChunkedReader is not initialised: call __init__ first");
        return NULL;
    }
    /* Held for the whole read: the Python code called below may re-initialise this reader. */
    PyObject *sock = Py_NewRef(self->sock), *conn = Py_NewRef(self->conn);
    PyObject *done = Py_NewRef(self->done), *lost = Py_NewRef(self->lost);
    Py_ssize_t size = self->size;
    PyObject *deliver = NULL, *result = NULL;

    PyObject *fdobj = PyObject_CallMethodNoArgs(sock, s_fileno);
    if (fdobj == NULL)
        goto out;
    long fd = PyLong_AsLong(fdobj);
    Py_DECREF(fdobj);
    if (fd == -1 && PyErr_Occurred())
        goto out;
    if (fd < 0) {
        result = Py_NewRef(lost);
        goto out;
    }
    /* Decode here only at a chunk boundary of a chunked body being delivered. */
    int ok = at_chunk_boundary(conn, &deliver);
    if (ok < 0)
        goto out;
    Py_ssize_t n;
    do {
        n = recv((int)fd, read_buffer, (size_t)size, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
        result = Py_NewRef(errno == EAGAIN || errno == EWOULDBLOCK ? Py_None : lost);
        goto out;
    }
    if (n == 0) {
        result = Py_NewRef(done);
        goto out;
    }

    Py_ssize_t starts[MAX_CHUNKS], sizes[MAX_CHUNKS], total = 0;
    int chunks = ok ? whole_chunks(read_buffer, n, starts, sizes, &total) : 0;
    PyObject *r;
    if (chunks == 0) {
        PyObject *data = PyBytes_FromStringAndSize(read_buffer, n);
        if (data == NULL) {
            r = report_failure(conn);
        } else {
            r = PyObject_CallMethodOneArg(conn, s_dataReceived, data);
            Py_DECREF(data);
        }
    } else {
        PyObject *payload = PyBytes_FromStringAndSize(NULL, total);
        if (payload == NULL) {
            r = report_failure(conn);
        } else {
            char *o = PyBytes_AS_STRING(payload);
            for (int i = 0; i < chunks; i++) {
                memcpy(o, read_buffer + starts[i], sizes[i]);
                o += sizes[i];
            }
            r = PyObject_CallOneArg(deliver, payload);
            Py_DECREF(payload);
            /* As the Python parser does: a failing consumer breaks the connection. */
            if (r == NULL)
                r = report_failure(conn);
        }
    }
    if (r != NULL) {
        Py_DECREF(r);
        result = Py_NewRef(Py_None);
    }
out:
    Py_XDECREF(deliver);
    Py_DECREF(sock);
    Py_DECREF(conn);
    Py_DECREF(done);
    Py_DECREF(lost);
    return result;
}

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"sock", "conn", "done", "lost", "size", NULL};
    PyObject *sock, *conn, *done, *lost;
    Py_ssize_t size = MAX_READ;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO|n", kwlist, &sock, &conn, &done, &lost, &size))
        return -1;
    if (size <= 0 || size > MAX_READ) {
        PyErr_Format(PyExc_ValueError, "size must be 1..%d", MAX_READ);
        return -1;
    }
    Py_XSETREF(self->sock, Py_NewRef(sock));
    Py_XSETREF(self->conn, Py_NewRef(conn));
    Py_XSETREF(self->done, Py_NewRef(done));
    Py_XSETREF(self->lost, Py_NewRef(lost));
    self->size = size;
    return 0;
}

static int
Reader_traverse(Reader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->sock);
    Py_VISIT(self->conn);
    Py_VISIT(self->done);
    Py_VISIT(self->lost);
    return 0;
}

static int
Reader_clear(Reader *self)
{
    Py_CLEAR(self->sock);
    Py_CLEAR(self->conn);
    Py_CLEAR(self->done);
    Py_CLEAR(self->lost);
    return 0;
}

static void
Reader_dealloc(Reader *self)
{
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Reader_methods[] = {
    {"do_read", (PyCFunction)Reader_do_read, METH_NOARGS,
     "do_read() -> None | done | lost: read the socket once (a transport's doRead)."},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aura_proxy._chunked_read.ChunkedReader",
    .tp_doc = "ChunkedReader(sock, conn, done, lost, size=65536): an upstream connection's doRead.",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aura_proxy._chunked_read",
    .m_doc = "An upstream connection's socket read, chunked bodies decoded in C (see aura_proxy.fastclient).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__chunked_read(void)
{
    if (!(s_mode = PyUnicode_InternFromString(A_MODE)) ||
        !(s_buf = PyUnicode_InternFromString(A_BUF)) ||
        !(s_left = PyUnicode_InternFromString(A_LEFT)) ||
        !(s_deliver = PyUnicode_InternFromString(A_DELIVER)) ||
        !(s_dataReceived = PyUnicode_InternFromString(A_DATA_RECEIVED)) ||
        !(s_fileno = PyUnicode_InternFromString("fileno")) ||
        !(s_failed = PyUnicode_InternFromString(A_FAILED)))
        return NULL;
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *constants = Py_BuildValue("{sisisL}", "MODE_CHUNKED", MODE_CHUNKED, "MAX_READ", MAX_READ,
                                        "MAX_CHUNK_SIZE", (long long)MAX_CHUNK_SIZE);
    PyObject *attributes = Py_BuildValue("(ssssss)", A_MODE, A_BUF, A_LEFT, A_DELIVER, A_DATA_RECEIVED, A_FAILED);
    int ok = constants != NULL && attributes != NULL
        && PyModule_AddObjectRef(m, "ChunkedReader", (PyObject *)&ReaderType) == 0
        && PyModule_AddObjectRef(m, "CONSTANTS", constants) == 0
        && PyModule_AddObjectRef(m, "CONNECTION_ATTRIBUTES", attributes) == 0;
    Py_XDECREF(constants);
    Py_XDECREF(attributes);
    if (!ok) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
