/*
 * aura_proxy._sse_stamp: the SSE rewriter's common case in C.
 *
 * A relayed stream's reads are, nearly always, whole blocks with LF line
 * ends.  For those, Stamper.feed does what aura_proxy.sse.SseRewriter does in
 * Python (stamp the gateway's id, drop the upstream's id lines, remember the
 * upstream id, hand each stamped block to on_event) in one call, without the
 * dozen Python calls and temporary objects that cost per event.  Anything
 * else (a CR anywhere, a read that ends inside a block, state left from an
 * earlier read) goes to the Python rewriter through `fallback`, untouched;
 * both share this object's state (seq, upstream, slow).  The Python code is
 * the reference: tests/test_sse_accel.py checks that both give the same bytes
 * for arbitrary streams split at arbitrary points.
 *
 * EventStore (below) is the memory resume log's per-stream storage; a
 * Stamper handed one as on_event copies each stamped block into it directly
 * (tests/test_event_store.py checks it against the Python store).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

/*
 * Values shared with aura_proxy/sse.py, which defines them: the module exports
 * them as CONSTANTS and sse does not use this module unless they equal its
 * own (a stale build then runs in Python, and says so).
 */
/* Upstream ids longer than this are not carried (sse.MAX_CARRIED_UPSTREAM_ID). */
#define MAX_CARRIED 96
/* The line put first in a stamped block (sse._ID_FIELD), before the gateway id. */
#define ID_FIELD "id: "
#define ID_FIELD_LEN ((Py_ssize_t)sizeof(ID_FIELD) - 1)
/* Between the sequence number and the carried upstream id (sse._CARRY_SEPARATOR). */
#define CARRY_SEPARATOR "."
/* A blank line after a line's LF: the end of a block (sse._LFLF). */
#define BLOCK_END "\n\n"
/* The carried id's encoding: base64url without padding (sse._BASE64URL_ALPHABET). */
static const char B64URL[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* "." + base64url of MAX_CARRIED bytes without padding. */
#define MAX_SUFFIX (1 + (MAX_CARRIED * 4 + 2) / 3)
/* Decimal digits of a long long, with room to spare. */
#define MAX_DIGITS 24

/*
 * EventStore: one stream's kept events for resumption (the memory resume
 * log's storage, aura_proxy.resume.log).  The events' bytes lie back to back
 * in one ring buffer, their sequence numbers and lengths in two ring arrays;
 * the oldest go first once there are more than max_events of them or more
 * than max_bytes (the newest is always kept).  Eviction happens before a new
 * event is copied in, so the space it frees is reused at once: the buffers
 * grow only while the kept events grow, by 1.5x but never beyond max_bytes
 * bytes and max_events entries (unless one event alone is larger), and a
 * stream at its limits holds about what it keeps: capacity <= max(max_bytes,
 * largest event) + ENTRY_BYTES x max_events.  That capacity (`footprint`) is
 * what the log's global cap counts; on_grow, when set, is told each change
 * of it (at most about 30 times in a stream's life, never per event once the
 * stream is at its limits).  A Stamper whose on_event is an EventStore adds
 * to it without any Python object per event; live subscribers (a resumed
 * client following the stream) are handed each event as bytes.
 * aura_proxy.resume.log._PyEventStore is the reference, with the same
 * growth rules (tests/test_event_store.py compares capacities too).
 */
/* Bytes per kept-event slot: its sequence number and its length. */
#define ENTRY_BYTES ((Py_ssize_t)(sizeof(long long) + sizeof(Py_ssize_t)))

typedef struct {
    PyObject_HEAD
    char *data;            /* ring of cap bytes: the kept events from data[start], size bytes */
    Py_ssize_t cap, start, size;
    long long *seqs;       /* rings of slots entries: the kept events from [head], count of them */
    Py_ssize_t *lens;
    Py_ssize_t slots, head, count;
    long long first_seq;   /* events before this one are no longer kept */
    long long last_seq;
    Py_ssize_t max_events, max_bytes;  /* 0 until __init__ */
    int ended;             /* the stream ended: add() keeps nothing more */
    PyObject *subscribers; /* set of attachments (with .subscriber), or NULL */
    PyObject *on_grow;     /* callable(delta of footprint), or NULL */
    int busy;              /* add, events_after or on_grow running: __init__ and release are refused */
    unsigned long long version;  /* bumped by every change of the buffers */
} EventStore;

static PyTypeObject EventStoreType;

/* 0 if __init__ has run; else -1 with RuntimeError (made by __new__ alone, or a subclass skipped it). */
static int
store_ready(EventStore *self)
{
    if (self->max_events > 0)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "EventStore is not initialised: call __init__ first");
    return -1;
}

/* Free the buffers: nothing kept, nothing reserved. */
static void
store_free(EventStore *self)
{
    self->version++;
    PyMem_Free(self->data);
    PyMem_Free(self->seqs);
    PyMem_Free(self->lens);
    self->data = NULL;
    self->seqs = NULL;
    self->lens = NULL;
    self->cap = self->start = self->size = 0;
    self->slots = self->head = self->count = 0;
}

static int
EventStore_init(EventStore *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"max_events", "max_bytes", NULL};
    Py_ssize_t max_events, max_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn", kwlist, &max_events, &max_bytes))
        return -1;
    if (max_events < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "max_events and max_bytes must be at least 1");
        return -1;
    }
    if (self->busy) {
        /* Called from a subscriber or a finalizer: the running method still uses the buffers. */
        PyErr_SetString(PyExc_RuntimeError, "EventStore.__init__ called while the store is in use");
        return -1;
    }
    store_free(self);
    self->first_seq = 1;
    self->last_seq = 0;
    self->max_events = max_events;
    self->max_bytes = max_bytes;
    self->ended = 0;
    Py_CLEAR(self->subscribers);
    Py_CLEAR(self->on_grow);
    return 0;
}

/* Forget the oldest kept event. */
static void
store_evict(EventStore *self)
{
    Py_ssize_t len = self->lens[self->head];
    self->first_seq = self->seqs[self->head] + 1;
    self->size -= len;
    self->start += len;
    if (self->start >= self->cap)
        self->start -= self->cap;
    if (++self->head == self->slots)
        self->head = 0;
    if (--self->count == 0)
        self->start = self->head = 0;
}

/*
 * Room for n more bytes and one more entry (the evictions done): grow the
 * rings, by 1.5x up to the limits, copying what is kept to their start.
 * Adds to *grown the bytes reserved in addition.
 */
static int
store_reserve(EventStore *self, Py_ssize_t n, Py_ssize_t *grown)
{
    if (self->size + n > self->cap) {
        Py_ssize_t cap = self->cap + self->cap / 2 + 64;
        if (cap > self->max_bytes)
            cap = self->max_bytes;
        if (cap < self->size + n)
            cap = self->size + n;
        char *data = PyMem_Malloc(cap);
        if (data == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        Py_ssize_t first = self->cap - self->start;
        if (first > self->size)
            first = self->size;
        if (self->size > 0) {
            memcpy(data, self->data + self->start, first);
            memcpy(data + first, self->data, self->size - first);
        }
        PyMem_Free(self->data);
        *grown += cap - self->cap;
        self->data = data;
        self->cap = cap;
        self->start = 0;
    }
    if (self->count == self->slots) {
        Py_ssize_t slots = self->slots + self->slots / 2 + 4;
        if (slots > self->max_events)
            slots = self->max_events;
        long long *seqs = PyMem_Malloc(slots * sizeof(long long));
        Py_ssize_t *lens = PyMem_Malloc(slots * sizeof(Py_ssize_t));
        if (seqs == NULL || lens == NULL) {
            PyMem_Free(seqs);
            PyMem_Free(lens);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0, j = self->head; i < self->count; i++) {
            seqs[i] = self->seqs[j];
            lens[i] = self->lens[j];
            if (++j == self->slots)
                j = 0;
        }
        PyMem_Free(self->seqs);
        PyMem_Free(self->lens);
        *grown += (slots - self->slots) * ENTRY_BYTES;
        self->seqs = seqs;
        self->lens = lens;
        self->slots = slots;
        self->head = 0;
    }
    return 0;
}

/* Hand one event to every live subscriber (a snapshot: replay_event may detach). */
static int
store_notify(EventStore *self, long long seq, PyObject *block)
{
    PyObject *attachments = PySequence_List(self->subscribers);
    if (attachments == NULL)
        return -1;
    PyObject *seq_obj = PyLong_FromLongLong(seq);
    int rc = seq_obj == NULL ? -1 : 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PyList_GET_SIZE(attachments); i++) {
        PyObject *subscriber = PyObject_GetAttrString(PyList_GET_ITEM(attachments, i), "subscriber");
        if (subscriber == NULL) {
            rc = -1;
            break;
        }
        PyObject *r = PyObject_CallMethod(subscriber, "replay_event", "OO", seq_obj, block);
        Py_DECREF(subscriber);
        if (r == NULL)
            rc = -1;
        Py_XDECREF(r);
    }
    Py_XDECREF(seq_obj);
    Py_DECREF(attachments);
    return rc;
}

/* Tell on_grow that the footprint changed by delta. */
static int
store_tell_growth(EventStore *self, Py_ssize_t delta)
{
    PyObject *on_grow = Py_XNewRef(self->on_grow);
    if (on_grow == NULL)
        return 0;
    PyObject *d = PyLong_FromSsize_t(delta);
    PyObject *r = d == NULL ? NULL : PyObject_CallOneArg(on_grow, d);
    Py_XDECREF(d);
    Py_DECREF(on_grow);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/*
 * Keep event seq (its bytes: buf[0:n]).  block is the same bytes as an
 * object, or NULL: then one is made only if a subscriber needs it.
 */
static int
store_add(EventStore *self, long long seq, const char *buf, Py_ssize_t n, PyObject *block)
{
    if (store_ready(self) < 0)
        return -1;
    if (self->ended)
        return 0;
    self->version++;
    /* The same as evicting after the add while there are more than
     * max_events or max_bytes and more than the new event, done first so
     * that the new event goes into the space freed. */
    while (self->count > 0 && (self->count >= self->max_events || self->size + n > self->max_bytes))
        store_evict(self);
    Py_ssize_t grown = 0;
    if (store_reserve(self, n, &grown) < 0)
        return -1;
    if (n > 0) {
        Py_ssize_t pos = self->start + self->size;
        if (pos >= self->cap)
            pos -= self->cap;
        Py_ssize_t first = self->cap - pos;
        if (first > n)
            first = n;
        memcpy(self->data + pos, buf, first);
        memcpy(self->data, buf + first, n - first);
    }
    Py_ssize_t slot = self->head + self->count;
    if (slot >= self->slots)
        slot -= self->slots;
    self->seqs[slot] = seq;
    self->lens[slot] = n;
    self->count++;
    self->size += n;
    self->last_seq = seq;
    int rc = 0;
    self->busy++;
    if (grown != 0)
        rc = store_tell_growth(self, grown);
    if (rc == 0 && self->subscribers != NULL && PySet_GET_SIZE(self->subscribers) != 0) {
        if (block != NULL)
            Py_INCREF(block);
        else
            block = PyBytes_FromStringAndSize(buf, n);
        rc = block == NULL ? -1 : store_notify(self, seq, block);
        Py_XDECREF(block);
    }
    self->busy--;
    return rc;
}

static PyObject *
EventStore_add(EventStore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(seq, block) takes 2 arguments");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(args[0]);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "block must be bytes");
        return NULL;
    }
    if (store_add(self, seq, PyBytes_AS_STRING(args[1]), PyBytes_GET_SIZE(args[1]), args[1]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
EventStore_call(EventStore *self, PyObject *args, PyObject *kwds)
{
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "an EventStore takes no keyword arguments");
        return NULL;
    }
    return EventStore_add(self, &PyTuple_GET_ITEM(args, 0), PyTuple_GET_SIZE(args));
}

static PyObject *
EventStore_release(EventStore *self, PyObject *unused)
{
    if (store_ready(self) < 0)
        return NULL;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "EventStore.release called while the store is in use");
        return NULL;
    }
    Py_ssize_t freed = self->cap + self->slots * ENTRY_BYTES;
    store_free(self);
    self->ended = 1;
    self->first_seq = self->last_seq + 1;
    return PyLong_FromSsize_t(freed);
}

static PyObject *
EventStore_events_after(EventStore *self, PyObject *arg)
{
    if (store_ready(self) < 0)
        return NULL;
    long long after = PyLong_AsLongLong(arg);
    if (after == -1 && PyErr_Occurred())
        return NULL;
    /* Making the list and tuples can run a finalizer's Python code (the
     * garbage collector runs then), which could add to this store and move
     * its bytes: such a change is an error, as a dict changed during
     * iteration is. */
    unsigned long long version = self->version;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    self->busy++;
    Py_ssize_t pos = self->start;
    for (Py_ssize_t i = 0;; i++) {
        if (self->version != version) {
            PyErr_SetString(PyExc_RuntimeError, "EventStore changed during events_after");
            goto error;
        }
        if (i >= self->count)
            break;
        Py_ssize_t slot = self->head + i;
        if (slot >= self->slots)
            slot -= self->slots;
        Py_ssize_t len = self->lens[slot];
        long long seq = self->seqs[slot];
        if (seq > after) {
            PyObject *block = PyBytes_FromStringAndSize(NULL, len);
            if (block == NULL)
                goto error;
            if (self->version != version) {
                Py_DECREF(block);
                continue;  /* reported at the top of the loop */
            }
            Py_ssize_t first = self->cap - pos;
            if (first > len)
                first = len;
            if (len > 0) {
                memcpy(PyBytes_AS_STRING(block), self->data + pos, first);
                memcpy(PyBytes_AS_STRING(block) + first, self->data, len - first);
            }
            PyObject *item = Py_BuildValue("(LN)", seq, block);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                goto error;
            }
            Py_DECREF(item);
        }
        pos += len;
        if (pos >= self->cap)
            pos -= self->cap;
    }
    self->busy--;
    return out;
error:
    self->busy--;
    Py_DECREF(out);
    return NULL;
}

static Py_ssize_t
EventStore_len(EventStore *self)
{
    if (store_ready(self) < 0)
        return -1;
    return self->count;
}

/* The read-only sizes (size, capacity, slots), by offset. */
static PyObject *
EventStore_get_ssize(EventStore *self, void *offset)
{
    if (store_ready(self) < 0)
        return NULL;
    return PyLong_FromSsize_t(*(Py_ssize_t *)((char *)self + (Py_ssize_t)offset));
}

static PyObject *
EventStore_get_footprint(EventStore *self, void *closure)
{
    if (store_ready(self) < 0)
        return NULL;
    return PyLong_FromSsize_t(self->cap + self->slots * ENTRY_BYTES);
}

/* The read-only numbers (first_seq, last_seq), by offset. */
static PyObject *
EventStore_get_long_long(EventStore *self, void *offset)
{
    if (store_ready(self) < 0)
        return NULL;
    return PyLong_FromLongLong(*(long long *)((char *)self + (Py_ssize_t)offset));
}

static PyObject *
EventStore_get_subscribers(EventStore *self, void *closure)
{
    if (store_ready(self) < 0)
        return NULL;
    PyObject *s = self->subscribers ? self->subscribers : Py_None;
    Py_INCREF(s);
    return s;
}

static int
EventStore_set_subscribers(EventStore *self, PyObject *value, void *closure)
{
    if (store_ready(self) < 0)
        return -1;
    if (value == NULL || value == Py_None) {
        Py_CLEAR(self->subscribers);
        return 0;
    }
    if (!PyAnySet_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "subscribers must be a set or None");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->subscribers, value);
    return 0;
}

static PyObject *
EventStore_get_on_grow(EventStore *self, void *closure)
{
    if (store_ready(self) < 0)
        return NULL;
    return Py_NewRef(self->on_grow ? self->on_grow : Py_None);
}

static int
EventStore_set_on_grow(EventStore *self, PyObject *value, void *closure)
{
    if (store_ready(self) < 0)
        return -1;
    if (value == NULL || value == Py_None) {
        Py_CLEAR(self->on_grow);
        return 0;
    }
    if (!PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "on_grow must be callable or None");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->on_grow, value);
    return 0;
}

static PyObject *
EventStore_get_ended(EventStore *self, void *closure)
{
    if (store_ready(self) < 0)
        return NULL;
    return PyBool_FromLong(self->ended);
}

static int
EventStore_set_ended(EventStore *self, PyObject *value, void *closure)
{
    if (store_ready(self) < 0)
        return -1;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "ended cannot be deleted");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0)
        return -1;
    self->ended = truth;
    return 0;
}

static int
EventStore_traverse(EventStore *self, visitproc visit, void *arg)
{
    Py_VISIT(self->subscribers);
    Py_VISIT(self->on_grow);
    return 0;
}

static int
EventStore_clear(EventStore *self)
{
    Py_CLEAR(self->subscribers);
    Py_CLEAR(self->on_grow);
    return 0;
}

static void
EventStore_dealloc(EventStore *self)
{
    PyObject_GC_UnTrack(self);
    EventStore_clear(self);
    PyMem_Free(self->data);
    PyMem_Free(self->seqs);
    PyMem_Free(self->lens);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyGetSetDef EventStore_getset[] = {
    {"size", (getter)EventStore_get_ssize, NULL, "Bytes of the kept events.",
     (void *)offsetof(EventStore, size)},
    {"capacity", (getter)EventStore_get_ssize, NULL, "Bytes reserved for events (the data ring).",
     (void *)offsetof(EventStore, cap)},
    {"slots", (getter)EventStore_get_ssize, NULL, "Entries reserved for events (the seq and length rings).",
     (void *)offsetof(EventStore, slots)},
    {"footprint", (getter)EventStore_get_footprint, NULL,
     "Bytes the store reserves: capacity + ENTRY_BYTES x slots.", NULL},
    {"subscribers", (getter)EventStore_get_subscribers, (setter)EventStore_set_subscribers,
     "Attachments that get each new event (their .subscriber.replay_event), or None.", NULL},
    {"on_grow", (getter)EventStore_get_on_grow, (setter)EventStore_set_on_grow,
     "Called with the change of footprint each time the buffers grow, or None.", NULL},
    {"ended", (getter)EventStore_get_ended, (setter)EventStore_set_ended,
     "Whether the stream ended: add() keeps nothing more.", NULL},
    {"first_seq", (getter)EventStore_get_long_long, NULL,
     "The oldest sequence number that can still be kept (1 until the first eviction).",
     (void *)offsetof(EventStore, first_seq)},
    {"last_seq", (getter)EventStore_get_long_long, NULL, "The newest event's sequence number.",
     (void *)offsetof(EventStore, last_seq)},
    {"max_events", (getter)EventStore_get_ssize, NULL, "Events kept at most.",
     (void *)offsetof(EventStore, max_events)},
    {"max_bytes", (getter)EventStore_get_ssize, NULL, "Bytes kept at most (the newest event always).",
     (void *)offsetof(EventStore, max_bytes)},
    {NULL},
};

static PyMethodDef EventStore_methods[] = {
    {"add", (PyCFunction)(void (*)(void))EventStore_add, METH_FASTCALL,
     "add(seq, block): keep event seq and pass it to live subscribers (calling the store does the same)."},
    {"events_after", (PyCFunction)EventStore_events_after, METH_O,
     "events_after(seq) -> list of (seq, block): the kept events after seq, in order."},
    {"release", (PyCFunction)EventStore_release, METH_NOARGS,
     "release() -> int: free the buffers and end the store (add keeps nothing more); the footprint freed."},
    {NULL},
};

static PySequenceMethods EventStore_as_sequence = {
    .sq_length = (lenfunc)EventStore_len,
};

static PyTypeObject EventStoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aura_proxy._sse_stamp.EventStore",
    .tp_doc = "EventStore(max_events, max_bytes): one stream's kept events (see aura_proxy.resume.log).",
    .tp_basicsize = sizeof(EventStore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)EventStore_init,
    .tp_dealloc = (destructor)EventStore_dealloc,
    .tp_traverse = (traverseproc)EventStore_traverse,
    .tp_clear = (inquiry)EventStore_clear,
    .tp_call = (ternaryfunc)EventStore_call,
    .tp_as_sequence = &EventStore_as_sequence,
    .tp_methods = EventStore_methods,
    .tp_getset = EventStore_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *prefix;     /* bytes: "<stream id>."; NULL until __init__ */
    int carry;            /* ids carry the upstream's id */
    long long seq;        /* blocks stamped so far */
    PyObject *upstream;   /* bytes, or NULL for none yet */
    char suffix[MAX_SUFFIX];
    Py_ssize_t suffix_len;
    PyObject *suffix_of;  /* the upstream value suffix encodes, or NULL */
    PyObject *on_event;   /* callable(seq, block), or NULL */
    EventStore *store;    /* on_event, when it is an EventStore: added to directly */
    PyObject *fallback;   /* callable(data) -> bytes: the Python rewriter; NULL until __init__ */
    int slow;             /* the Python rewriter holds state: use fallback */
    int feeding;          /* feed is running: __init__ is refused */
} Stamper;

/* 0 if __init__ has run; else -1 with RuntimeError (made by __new__ alone). */
static int
stamper_ready(Stamper *self)
{
    if (self->prefix != NULL && self->fallback != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "Stamper is not initialised: call __init__ first");
    return -1;
}

/* The suffix ("" or ".<base64url>") for the current upstream id. */
static void
update_suffix(Stamper *self)
{
    PyObject *up = self->upstream;
    if (up == self->suffix_of)
        return;
    Py_XINCREF(up);
    Py_XSETREF(self->suffix_of, up);
    self->suffix_len = 0;
    if (!self->carry || up == NULL || PyBytes_GET_SIZE(up) > MAX_CARRIED)
        return;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(up);
    Py_ssize_t n = PyBytes_GET_SIZE(up), i = 0;
    char *o = self->suffix;
    *o++ = CARRY_SEPARATOR[0];
    for (; i + 2 < n; i += 3) {
        unsigned v = (s[i] << 16) | (s[i + 1] << 8) | s[i + 2];
        *o++ = B64URL[(v >> 18) & 63];
        *o++ = B64URL[(v >> 12) & 63];
        *o++ = B64URL[(v >> 6) & 63];
        *o++ = B64URL[v & 63];
    }
    if (n - i == 1) {
        unsigned v = s[i] << 16;
        *o++ = B64URL[(v >> 18) & 63];
        *o++ = B64URL[(v >> 12) & 63];
    } else if (n - i == 2) {
        unsigned v = (s[i] << 16) | (s[i + 1] << 8);
        *o++ = B64URL[(v >> 18) & 63];
        *o++ = B64URL[(v >> 12) & 63];
        *o++ = B64URL[(v >> 6) & 63];
    }
    self->suffix_len = o - self->suffix;
}

/* The most bytes write_id writes. */
static Py_ssize_t
max_id_len(Stamper *self)
{
    return PyBytes_GET_SIZE(self->prefix) + MAX_DIGITS + MAX_SUFFIX;
}

/* Write the id of event `seq` at `o`; return the end. */
static char *
write_id(Stamper *self, char *o, long long seq)
{
    Py_ssize_t plen = PyBytes_GET_SIZE(self->prefix);
    memcpy(o, PyBytes_AS_STRING(self->prefix), plen);
    o += plen;
    char digits[MAX_DIGITS];
    int k = 0;
    unsigned long long v = (unsigned long long)seq;
    do {
        digits[k++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (k)
        *o++ = digits[--k];
    update_suffix(self);
    memcpy(o, self->suffix, self->suffix_len);
    return o + self->suffix_len;
}

/*
 * Rewrite one block: `p`..`p + n` is its lines joined by LF (no blank line).
 * Writes the result and its terminating blank line at `o`; returns the end.
 * Sets *stamped when the block got an id.  Same rules as SseRewriter._block.
 */
static char *
rewrite_block(Stamper *self, const char *p, Py_ssize_t n, char *o, int *stamped)
{
    int has_data = 0, has_id_line = 0;
    const char *up = NULL;  /* last valid id value */
    Py_ssize_t up_len = 0;
    const char *line = p, *end = p + n;
    while (line <= end) {
        const char *nl = memchr(line, '\n', end - line);
        const char *le = nl ? nl : end;
        Py_ssize_t len = le - line;
        if (len >= 4 && memcmp(line, "data", 4) == 0) {
            if (len == 4 || line[4] == ':')
                has_data = 1;
        } else if (len >= 2 && line[0] == 'i' && line[1] == 'd' && (len == 2 || line[2] == ':')) {
            has_id_line = 1;
            const char *v = line + (len > 3 ? 3 : len);
            if (v < le && *v == ' ')
                v++;
            if (memchr(v, '\0', le - v) == NULL) {
                up = v;
                up_len = le - v;
            }
        }
        if (!nl)
            break;
        line = nl + 1;
    }
    *stamped = 0;
    if (!has_data && up == NULL) {
        memcpy(o, p, n);
        o += n;
        *o++ = '\n';
        *o++ = '\n';
        return o;
    }
    if (up != NULL) {
        PyObject *value = PyBytes_FromStringAndSize(up, up_len);
        if (value == NULL)
            return NULL;
        Py_XSETREF(self->upstream, value);
    }
    /* Unsigned: a seq set to LLONG_MAX wraps instead of overflowing. */
    self->seq = (long long)((unsigned long long)self->seq + 1);
    *stamped = 1;
    memcpy(o, ID_FIELD, ID_FIELD_LEN);
    o = write_id(self, o + ID_FIELD_LEN, self->seq);
    *o++ = '\n';
    if (!has_id_line) {
        memcpy(o, p, n);
        o += n;
    } else {
        /* Copy the lines that are not id lines, joined by LF. */
        char *start = o;
        line = p;
        while (line <= end) {
            const char *nl = memchr(line, '\n', end - line);
            const char *le = nl ? nl : end;
            Py_ssize_t len = le - line;
            if (!(len >= 2 && line[0] == 'i' && line[1] == 'd' && (len == 2 || line[2] == ':'))) {
                if (o != start)
                    *o++ = '\n';
                memcpy(o, line, len);
                o += len;
            }
            if (!nl)
                break;
            line = nl + 1;
        }
        if (o == start)
            /* No line left: "id: X\n" + "\n" (SseRewriter writes id + sep + sep). */
            return (*o++ = '\n', o);
    }
    *o++ = '\n';
    *o++ = '\n';
    return o;
}

/* At most this many stamped blocks per read are handed to on_event from the stack. */
#define STACK_EVENTS 16

/*
 * feed's work.  The Python code it calls (on_event, an EventStore's
 * subscribers, fallback) cannot re-initialise this stamper (Stamper_feed
 * refuses that), so prefix, on_event and store stay as they are; what it
 * may change (upstream, seq) is re-read after each call.
 */
static PyObject *
stamper_feed(Stamper *self, PyObject *data, PyObject *on_event, EventStore *store, PyObject *fallback)
{
    if (self->slow || !PyBytes_CheckExact(data))
        return PyObject_CallOneArg(fallback, data);
    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (len == 0 || memchr(buf, '\r', len) != NULL)
        return PyObject_CallOneArg(fallback, data);
    /* Count the blocks: pieces between non-overlapping "\n\n", as bytes.split
     * finds them.  Whatever follows the last one must be empty, or the read
     * ends inside a block: the Python rewriter keeps such rests. */
    Py_ssize_t pieces = 0, pos = 0;
    for (;;) {
        const char *hit = memmem(buf + pos, len - pos, BLOCK_END, 2);
        if (hit == NULL)
            break;
        pieces++;
        pos = hit - buf + 2;
    }
    if (pos != len)
        return PyObject_CallOneArg(fallback, data);

    /* Per block at most: the id line (field, id, LF). */
    Py_ssize_t bound = len + pieces * (ID_FIELD_LEN + max_id_len(self) + 1);
    PyObject *out = PyBytes_FromStringAndSize(NULL, bound);
    if (out == NULL)
        return NULL;
    char *o0 = PyBytes_AS_STRING(out), *o = o0;
    Py_ssize_t starts_small[STACK_EVENTS], ends_small[STACK_EVENTS];
    long long seqs_small[STACK_EVENTS];
    Py_ssize_t *starts = starts_small, *ends = ends_small;
    long long *seqs = seqs_small;
    Py_ssize_t nev = 0;
    int heap = 0;
    if (on_event != NULL && store == NULL && pieces > STACK_EVENTS) {
        starts = PyMem_Malloc(pieces * sizeof(Py_ssize_t));
        ends = PyMem_Malloc(pieces * sizeof(Py_ssize_t));
        seqs = PyMem_Malloc(pieces * sizeof(long long));
        heap = 1;
        if (starts == NULL || ends == NULL || seqs == NULL) {
            PyErr_NoMemory();
            goto error;
        }
    }
    pos = 0;
    while (pos < len) {
        const char *p = buf + pos;
        const char *hit = memmem(p, len - pos, BLOCK_END, 2);
        Py_ssize_t n = hit - p;
        pos += n + 2;
        if (n == 0) {
            /* Two blank lines in a row. */
            *o++ = '\n';
            *o++ = '\n';
            continue;
        }
        if (*p == '\n') {
            /* A blank line before the block. */
            *o++ = '\n';
            p++;
            n--;
        }
        char *block_start = o;
        int stamped;
        o = rewrite_block(self, p, n, o, &stamped);
        if (o == NULL)
            goto error;
        if (stamped && store != NULL) {
            if (store_add(store, self->seq, block_start, o - block_start, NULL) < 0)
                goto error;
        } else if (stamped && on_event != NULL) {
            starts[nev] = block_start - o0;
            ends[nev] = o - o0;
            seqs[nev] = self->seq;
            nev++;
        }
    }
    Py_ssize_t size = o - o0;
    if (_PyBytes_Resize(&out, size) < 0)
        goto error_out_gone;
    for (Py_ssize_t i = 0; i < nev; i++) {
        PyObject *block;
        if (starts[i] == 0 && ends[i] == size) {
            Py_INCREF(out);
            block = out;
        } else {
            block = PyBytes_FromStringAndSize(PyBytes_AS_STRING(out) + starts[i], ends[i] - starts[i]);
            if (block == NULL)
                goto error;
        }
        PyObject *seq = PyLong_FromLongLong(seqs[i]);
        if (seq == NULL) {
            Py_DECREF(block);
            goto error;
        }
        PyObject *args[2] = {seq, block};
        PyObject *r = PyObject_Vectorcall(on_event, args, 2, NULL);
        Py_DECREF(seq);
        Py_DECREF(block);
        if (r == NULL)
            goto error;
        Py_DECREF(r);
    }
    if (heap) {
        PyMem_Free(starts);
        PyMem_Free(ends);
        PyMem_Free(seqs);
    }
    return out;
error:
    Py_XDECREF(out);
error_out_gone:
    if (heap) {
        PyMem_Free(starts);
        PyMem_Free(ends);
        PyMem_Free(seqs);
    }
    return NULL;
}

static PyObject *
Stamper_feed(Stamper *self, PyObject *data)
{
    if (stamper_ready(self) < 0)
        return NULL;
    /* Strong references for the whole call, whatever the Python code it runs does. */
    PyObject *on_event = Py_XNewRef(self->on_event), *fallback = Py_NewRef(self->fallback);
    Py_INCREF(data);
    self->feeding++;
    PyObject *out = stamper_feed(self, data, on_event, self->store, fallback);
    self->feeding--;
    Py_DECREF(data);
    Py_DECREF(fallback);
    Py_XDECREF(on_event);
    return out;
}

static PyObject *
Stamper_make_id(Stamper *self, PyObject *arg)
{
    if (stamper_ready(self) < 0)
        return NULL;
    long long seq = PyLong_AsLongLong(arg);
    if (seq == -1 && PyErr_Occurred())
        return NULL;
    if (seq < 0) {
        PyErr_SetString(PyExc_ValueError, "seq must not be negative");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, max_id_len(self));
    if (out == NULL)
        return NULL;
    char *o = write_id(self, PyBytes_AS_STRING(out), seq);
    if (_PyBytes_Resize(&out, o - PyBytes_AS_STRING(out)) < 0)
        return NULL;
    return out;
}

static int
Stamper_init(Stamper *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"prefix", "carry", "on_event", "fallback", NULL};
    PyObject *prefix, *on_event, *fallback;
    int carry;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SpOO", kwlist, &prefix, &carry, &on_event, &fallback))
        return -1;
    if (on_event != Py_None && !PyCallable_Check(on_event)) {
        PyErr_SetString(PyExc_TypeError, "on_event must be callable or None");
        return -1;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return -1;
    }
    if (self->feeding) {
        /* From on_event, a subscriber or fallback: feed's buffers are sized for the current prefix. */
        PyErr_SetString(PyExc_RuntimeError, "Stamper.__init__ called during feed");
        return -1;
    }
    Py_INCREF(prefix);
    Py_XSETREF(self->prefix, prefix);
    self->carry = carry;
    self->seq = 0;
    Py_CLEAR(self->upstream);
    Py_CLEAR(self->suffix_of);
    self->suffix_len = 0;
    self->store = NULL;
    if (on_event == Py_None) {
        Py_CLEAR(self->on_event);
    } else {
        Py_INCREF(on_event);
        Py_XSETREF(self->on_event, on_event);
        if (PyObject_TypeCheck(on_event, &EventStoreType))
            self->store = (EventStore *)on_event;
    }
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    self->slow = 1;
    return 0;
}

static int
Stamper_traverse(Stamper *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_event);
    Py_VISIT(self->fallback);
    return 0;
}

static int
Stamper_clear(Stamper *self)
{
    self->store = NULL;
    Py_CLEAR(self->on_event);
    Py_CLEAR(self->fallback);
    return 0;
}

static void
Stamper_dealloc(Stamper *self)
{
    PyObject_GC_UnTrack(self);
    Stamper_clear(self);
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->upstream);
    Py_CLEAR(self->suffix_of);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Stamper_get_upstream(Stamper *self, void *closure)
{
    if (stamper_ready(self) < 0)
        return NULL;
    PyObject *up = self->upstream ? self->upstream : Py_None;
    Py_INCREF(up);
    return up;
}

static int
Stamper_set_upstream(Stamper *self, PyObject *value, void *closure)
{
    if (stamper_ready(self) < 0)
        return -1;
    if (value == NULL || value == Py_None) {
        Py_CLEAR(self->upstream);
        return 0;
    }
    if (!PyBytes_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "upstream must be bytes or None");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->upstream, value);
    return 0;
}

static PyObject *
Stamper_get_seq(Stamper *self, void *closure)
{
    if (stamper_ready(self) < 0)
        return NULL;
    return PyLong_FromLongLong(self->seq);
}

static int
Stamper_set_seq(Stamper *self, PyObject *value, void *closure)
{
    if (stamper_ready(self) < 0)
        return -1;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "seq cannot be deleted");
        return -1;
    }
    long long seq = PyLong_AsLongLong(value);
    if (seq == -1 && PyErr_Occurred())
        return -1;
    if (seq < 0) {
        PyErr_SetString(PyExc_ValueError, "seq must not be negative");
        return -1;
    }
    self->seq = seq;
    return 0;
}

static PyObject *
Stamper_get_slow(Stamper *self, void *closure)
{
    if (stamper_ready(self) < 0)
        return NULL;
    return PyLong_FromLong(self->slow);
}

static int
Stamper_set_slow(Stamper *self, PyObject *value, void *closure)
{
    if (stamper_ready(self) < 0)
        return -1;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "slow cannot be deleted");
        return -1;
    }
    int truth = PyObject_IsTrue(value);
    if (truth < 0)
        return -1;
    self->slow = truth;
    return 0;
}

static PyGetSetDef Stamper_getset[] = {
    {"upstream", (getter)Stamper_get_upstream, (setter)Stamper_set_upstream,
     "The upstream's last event id buffer (bytes), or None.", NULL},
    {"seq", (getter)Stamper_get_seq, (setter)Stamper_set_seq, "Blocks stamped so far.", NULL},
    {"slow", (getter)Stamper_get_slow, (setter)Stamper_set_slow,
     "Non-zero while the Python rewriter holds state: feed() goes to fallback.", NULL},
    {NULL},
};

static PyMethodDef Stamper_methods[] = {
    {"feed", (PyCFunction)Stamper_feed, METH_O,
     "feed(data) -> bytes: rewrite one upstream read (see SseRewriter.feed)."},
    {"make_id", (PyCFunction)Stamper_make_id, METH_O,
     "make_id(seq) -> bytes: the gateway id of event seq, carrying the current upstream id."},
    {NULL},
};

static PyTypeObject StamperType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "aura_proxy._sse_stamp.Stamper",
    .tp_doc = "Stamper(prefix, carry, on_event, fallback): SseRewriter's LF-only, whole-block case.",
    .tp_basicsize = sizeof(Stamper),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Stamper_init,
    .tp_dealloc = (destructor)Stamper_dealloc,
    .tp_traverse = (traverseproc)Stamper_traverse,
    .tp_clear = (inquiry)Stamper_clear,
    .tp_methods = Stamper_methods,
    .tp_getset = Stamper_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aura_proxy._sse_stamp",
    .m_doc = "The SSE rewriter's common case and the resume log's event store in C (see aura_proxy.sse, aura_proxy.resume.log).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__sse_stamp(void)
{
    if (PyType_Ready(&StamperType) < 0 || PyType_Ready(&EventStoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *constants = Py_BuildValue(
        "{sisnsy#sy#sy#sy#}", "MAX_CARRIED_UPSTREAM_ID", MAX_CARRIED,
        "EVENT_STORE_ENTRY_BYTES", ENTRY_BYTES,
        "ID_FIELD", ID_FIELD, ID_FIELD_LEN, "CARRY_SEPARATOR", CARRY_SEPARATOR, (Py_ssize_t)(sizeof(CARRY_SEPARATOR) - 1),
        "BLOCK_END", BLOCK_END, (Py_ssize_t)(sizeof(BLOCK_END) - 1),
        "BASE64URL_ALPHABET", B64URL, (Py_ssize_t)(sizeof(B64URL) - 1));
    int ok = constants != NULL
        && PyModule_AddObjectRef(m, "Stamper", (PyObject *)&StamperType) == 0
        && PyModule_AddObjectRef(m, "EventStore", (PyObject *)&EventStoreType) == 0
        && PyModule_AddObjectRef(m, "CONSTANTS", constants) == 0;
    Py_XDECREF(constants);
    if (!ok) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
