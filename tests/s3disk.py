"""A small S3 endpoint that keeps objects in files, for the large-file tests: a fake, and why.

The project prefers a real part to a fake; this one exists because no S3 endpoint we can run
in the tests holds objects of several GiB. moto's server (the endpoint of every other S3 test)
keeps a completed multipart object in memory twice and reads a whole object for every ranged
GET and every UploadPartCopy. s3rver 3.7.1 (npm, file-backed; tried for issue 13) answers
UploadPartCopy NotImplemented and AbortMultipartUpload MethodNotAllowed, ignores If-Match on
GET, has no ListMultipartUploads, and gives a multipart object the MD5 of its content as ETag
(S3: the MD5 of the parts' MD5s, "-N"), all of which the S3 executor relies on.

This server answers the calls the S3 executor makes (path-style: buckets, PUT/GET/HEAD/DELETE
of objects with Range, If-Match, If-None-Match and metadata, CopyObject, multipart uploads with
UploadPart(Copy), ListObjectsV2, DeleteObjects, ListMultipartUploads) and streams every body
to or from disk; zero-filled blocks are written as holes and copies visit only the source's
data, so a sparse 10 GiB object costs what it holds. No authentication, no versions, no fault
injection: it stands in for S3 only where size matters. Run: python tests/s3disk.py PORT DIRECTORY.
"""
from __future__ import annotations

import email.utils
import errno
import hashlib
import http.server
import json
import os
import shutil
import sys
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

BLOCK = 1 << 20
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class Store:
    def __init__(self, root: str):
        self.root = root
        self.lock = threading.Lock()

    def bucket(self, name: str) -> str:
        return os.path.join(self.root, "buckets", name)

    def obj(self, bucket: str, key: str) -> str:
        return os.path.join(self.bucket(bucket), urllib.parse.quote(key, safe="") + ".data")

    def meta_path(self, bucket: str, key: str) -> str:
        return self.obj(bucket, key)[:-5] + ".json"

    def head(self, bucket: str, key: str) -> dict | None:
        try:
            with open(self.meta_path(bucket, key)) as f:
                meta = json.load(f)
        except FileNotFoundError:
            return None
        meta["size"] = os.stat(self.obj(bucket, key)).st_size
        return meta

    def commit(self, bucket: str, key: str, tmp: str, etag: str, meta: dict) -> None:
        with self.lock:
            os.replace(tmp, self.obj(bucket, key))
            with open(self.meta_path(bucket, key) + ".tmp", "w") as f:
                json.dump({"etag": etag, "meta": meta, "mtime": time.time()}, f)
            os.replace(self.meta_path(bucket, key) + ".tmp", self.meta_path(bucket, key))

    def delete(self, bucket: str, key: str) -> None:
        with self.lock:
            for path in (self.obj(bucket, key), self.meta_path(bucket, key)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def keys(self, bucket: str) -> list[str]:
        return sorted(urllib.parse.unquote(n[:-5]) for n in os.listdir(self.bucket(bucket)) if n.endswith(".data"))

    def tmp(self) -> str:
        os.makedirs(os.path.join(self.root, "tmp"), exist_ok=True)
        return os.path.join(self.root, "tmp", uuid.uuid4().hex)

    def upload_dir(self, upload_id: str) -> str:
        return os.path.join(self.root, "uploads", upload_id)


def write_sparse(fd: int, data: bytes, offset: int) -> None:
    """Zero blocks become holes (the file was extended with ftruncate beforehand)."""
    for start in range(0, len(data), BLOCK):
        chunk = data[start:start + BLOCK]
        if chunk.count(0) != len(chunk):
            os.pwrite(fd, chunk, offset + start)


ZEROS = bytes(BLOCK)


def copy_range(src: str, dst_fd: int, start: int, length: int, at: int, md5=None) -> None:
    """Copy `length` bytes of `src` from `start` to `dst_fd` at `at` (extended beforehand),
    visiting only the source's data (SEEK_DATA/SEEK_HOLE): a hole stays a hole and costs no read,
    so assembling or copying a sparse 10 GiB object takes seconds (a client's 30 s read timeout
    would otherwise expire, and its retry find the upload gone). `md5`, if given, is fed the
    bytes as they are, zeros of the holes included."""
    end = start + length
    with open(src, "rb") as f:
        fd, pos = f.fileno(), start
        while pos < end:
            try:
                data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # no data after pos
                    raise
                data = end
            if md5 is not None:
                for off in range(pos, data, BLOCK):
                    md5.update(ZEROS[:min(BLOCK, data - off)])
            if data >= end:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
            f.seek(data)
            for off in range(data, hole, BLOCK):
                chunk = f.read(min(BLOCK, hole - off))
                if md5 is not None:
                    md5.update(chunk)
                write_sparse(dst_fd, chunk, at + off - start)
            pos = hole


def store_for(server) -> Store:
    return server.store


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    # -- plumbing -------------------------------------------------------------------
    def _parts(self):
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path).lstrip("/")
        bucket, _, key = path.partition("/")
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        return bucket, key, {k: v[0] for k, v in query.items()}

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or \
                "aws-chunked" in self.headers.get("Content-Encoding", ""):
            out = bytearray()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _xml(self, status: int, text: str, headers: dict | None = None) -> None:
        self._send(status, ('<?xml version="1.0" encoding="UTF-8"?>' + text).encode(),
                   {"Content-Type": "application/xml", **(headers or {})})

    def _error(self, status: int, code: str) -> None:
        if self.command == "HEAD":
            self._send(status)
            return
        self._xml(status, f"<Error><Code>{code}</Code><Message>{code}</Message></Error>")

    @staticmethod
    def _meta(headers) -> dict:
        return {k[len("x-amz-meta-"):].lower(): v for k, v in headers.items() if k.lower().startswith("x-amz-meta-")}

    def _object_headers(self, head: dict) -> dict:
        out = {"ETag": f'"{head["etag"]}"', "Last-Modified": email.utils.formatdate(head["mtime"], usegmt=True),
               "Content-Type": "binary/octet-stream", "Accept-Ranges": "bytes"}
        out.update({f"x-amz-meta-{k}": v for k, v in head["meta"].items()})
        return out

    # -- verbs ----------------------------------------------------------------------
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        st = self.server.store
        bucket, key, q = self._parts()
        if not os.path.isdir(st.bucket(bucket)):
            return self._error(404, "NoSuchBucket")
        if not key:
            if "uploads" in q:
                return self._list_uploads(bucket)
            if self.command == "HEAD":
                return self._send(200)
            return self._list(bucket, q)
        head = st.head(bucket, key)
        if head is None:
            return self._error(404, "NoSuchKey")
        match = self.headers.get("If-Match")
        if match and match.strip('"') != head["etag"]:
            return self._error(412, "PreconditionFailed")
        size = head["size"]
        headers = self._object_headers(head)
        rng = self.headers.get("Range")
        start, end, status = 0, size - 1, 200
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else size - 1, size - 1)
            if start >= size:
                return self._error(416, "InvalidRange")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        headers["Content-Length"] = str(length)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(st.obj(bucket, key), "rb") as f:
            f.seek(start)
            left = length
            while left:
                chunk = f.read(min(BLOCK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                left -= len(chunk)

    def do_PUT(self):
        st = self.server.store
        bucket, key, q = self._parts()
        if not key:
            os.makedirs(st.bucket(bucket), exist_ok=True)
            self._body()
            return self._send(200)
        if not os.path.isdir(st.bucket(bucket)):
            return self._error(404, "NoSuchBucket")
        source = self.headers.get("x-amz-copy-source")
        if "uploadId" in q:
            return self._upload_part(q, source)
        body = b"" if source else self._body()
        if source:
            src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
            head = st.head(src_bucket, src_key)
            if head is None:
                return self._error(404, "NoSuchKey")
            tmp = st.tmp()
            md5 = hashlib.md5()
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, head["size"])
                copy_range(st.obj(src_bucket, src_key), fd, 0, head["size"], 0, md5)
            finally:
                os.close(fd)
            replace = self.headers.get("x-amz-metadata-directive", "COPY").upper() == "REPLACE"
            meta = self._meta(self.headers) if replace else head["meta"]
            etag = md5.hexdigest()
            st.commit(bucket, key, tmp, etag, meta)
            return self._xml(200, f'<CopyObjectResult><ETag>"{etag}"</ETag>'
                                  f"<LastModified>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}"
                                  f"</LastModified></CopyObjectResult>")
        if self.headers.get("If-None-Match") == "*" and st.head(bucket, key) is not None:
            return self._error(412, "PreconditionFailed")
        tmp = st.tmp()
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, len(body))
            write_sparse(fd, body, 0)
        finally:
            os.close(fd)
        etag = hashlib.md5(body).hexdigest()
        st.commit(bucket, key, tmp, etag, self._meta(self.headers))
        self._send(200, headers={"ETag": f'"{etag}"'})

    def _upload_part(self, q: dict, source: str | None):
        st = self.server.store
        directory = st.upload_dir(q["uploadId"])
        if not os.path.isdir(directory):
            self._body()
            return self._error(404, "NoSuchUpload")
        number = int(q["partNumber"])
        part = os.path.join(directory, f"{number:05d}")
        fd = os.open(part + ".tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if source:
                src_bucket, _, src_key = urllib.parse.unquote(source).lstrip("/").partition("/")
                head = st.head(src_bucket, src_key)
                match = self.headers.get("x-amz-copy-source-if-match")
                if head is None:
                    return self._error(404, "NoSuchKey")
                if match and match.strip('"') != head["etag"]:
                    return self._error(412, "PreconditionFailed")
                a, _, b = self.headers["x-amz-copy-source-range"][6:].partition("-")
                start, length = int(a), int(b) - int(a) + 1
                os.ftruncate(fd, length)
                md5 = hashlib.md5()
                copy_range(st.obj(src_bucket, src_key), fd, start, length, 0, md5)
                etag = md5.hexdigest()
            else:
                body = self._body()
                os.ftruncate(fd, len(body))
                write_sparse(fd, body, 0)
                etag = hashlib.md5(body).hexdigest()
        finally:
            os.close(fd)
        os.replace(part + ".tmp", part)
        with open(part + ".etag", "w") as f:
            f.write(etag)
        if source:
            return self._xml(200, f'<CopyPartResult><ETag>"{etag}"</ETag>'
                                  f"<LastModified>{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime())}"
                                  f"</LastModified></CopyPartResult>")
        headers = {"ETag": f'"{etag}"'}
        if self.headers.get("x-amz-checksum-crc32"):
            headers["x-amz-checksum-crc32"] = self.headers["x-amz-checksum-crc32"]
        self._send(200, headers=headers)

    def do_POST(self):
        st = self.server.store
        bucket, key, q = self._parts()
        body = self._body()
        if "delete" in q:
            root = ET.fromstring(body)
            done = []
            for obj in root.iter(f"{NS}Object") if root.tag.startswith(NS) else root.iter("Object"):
                k = obj.find(f"{NS}Key") if root.tag.startswith(NS) else obj.find("Key")
                st.delete(bucket, k.text)
                done.append(k.text)
            return self._xml(200, "<DeleteResult>" + "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>" for k in done)
                             + "</DeleteResult>")
        if "uploads" in q:
            upload_id = uuid.uuid4().hex
            directory = st.upload_dir(upload_id)
            os.makedirs(directory)
            with open(os.path.join(directory, "upload.json"), "w") as f:
                json.dump({"bucket": bucket, "key": key, "meta": self._meta(self.headers), "at": time.time()}, f)
            return self._xml(200, f"<InitiateMultipartUploadResult><Bucket>{escape(bucket)}</Bucket>"
                                  f"<Key>{escape(key)}</Key><UploadId>{upload_id}</UploadId>"
                                  f"</InitiateMultipartUploadResult>")
        if "uploadId" in q:
            directory = st.upload_dir(q["uploadId"])
            if not os.path.isdir(directory):
                return self._error(404, "NoSuchUpload")
            with open(os.path.join(directory, "upload.json")) as f:
                info = json.load(f)
            root = ET.fromstring(body)
            tag = (lambda n: f"{NS}{n}") if root.tag.startswith(NS) else (lambda n: n)
            numbers = [int(p.find(tag("PartNumber")).text) for p in root.iter(tag("Part"))]
            parts = [os.path.join(directory, f"{n:05d}") for n in numbers]
            total = sum(os.stat(p).st_size for p in parts)
            tmp = st.tmp()
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
            digests = b""
            try:
                os.ftruncate(fd, total)
                at = 0
                for p in parts:
                    size = os.stat(p).st_size
                    copy_range(p, fd, 0, size, at)
                    at += size
                    with open(p + ".etag") as f:
                        digests += bytes.fromhex(f.read())
            finally:
                os.close(fd)
            etag = f"{hashlib.md5(digests).hexdigest()}-{len(parts)}"
            st.commit(bucket, key, tmp, etag, info["meta"])
            shutil.rmtree(directory, ignore_errors=True)
            return self._xml(200, f"<CompleteMultipartUploadResult><Bucket>{escape(bucket)}</Bucket>"
                                  f'<Key>{escape(key)}</Key><ETag>"{etag}"</ETag></CompleteMultipartUploadResult>')
        self._error(400, "InvalidRequest")

    def do_DELETE(self):
        st = self.server.store
        bucket, key, q = self._parts()
        if "uploadId" in q:
            shutil.rmtree(st.upload_dir(q["uploadId"]), ignore_errors=True)
            return self._send(204)
        st.delete(bucket, key)
        self._send(204)

    # -- listings ----------------------------------------------------------------------
    def _list(self, bucket: str, q: dict) -> None:
        st = self.server.store
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        start = q.get("continuation-token") or q.get("start-after", "")
        limit = int(q.get("max-keys", 1000))
        contents, prefixes = [], []
        for key in st.keys(bucket):
            if not key.startswith(prefix) or (start and key <= start):
                continue
            rest = key[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest.split(delimiter)[0] + delimiter
                if common not in prefixes:
                    if start and common <= start:
                        continue
                    prefixes.append(common)
            else:
                contents.append(key)
            if len(contents) + len(prefixes) >= limit:
                break
        last = max(contents[-1:] + prefixes[-1:]) if contents or prefixes else ""
        truncated = bool(last) and len(contents) + len(prefixes) >= limit
        items = []
        for key in contents:
            head = st.head(bucket, key)
            if head is None:
                continue
            items.append(f"<Contents><Key>{escape(key)}</Key><Size>{head['size']}</Size>"
                         f"<ETag>\"{head['etag']}\"</ETag><LastModified>"
                         f"{time.strftime('%Y-%m-%dT%H:%M:%S.000Z', time.gmtime(head['mtime']))}</LastModified>"
                         f"<StorageClass>STANDARD</StorageClass></Contents>")
        items += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in prefixes]
        token = f"<NextContinuationToken>{escape(last)}</NextContinuationToken>" if truncated else ""
        self._xml(200, f"<ListBucketResult><Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                       f"<KeyCount>{len(items)}</KeyCount><MaxKeys>{limit}</MaxKeys>"
                       f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{token}{''.join(items)}"
                       f"</ListBucketResult>")

    def _list_uploads(self, bucket: str) -> None:
        st = self.server.store
        items = []
        root = os.path.join(st.root, "uploads")
        for upload_id in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            try:
                with open(os.path.join(root, upload_id, "upload.json")) as f:
                    info = json.load(f)
            except FileNotFoundError:
                continue
            if info["bucket"] == bucket:
                items.append(f"<Upload><Key>{escape(info['key'])}</Key><UploadId>{upload_id}</UploadId></Upload>")
        self._xml(200, f"<ListMultipartUploadsResult><Bucket>{escape(bucket)}</Bucket>"
                       f"<IsTruncated>false</IsTruncated>{''.join(items)}</ListMultipartUploadsResult>")


def main() -> None:
    port, root = int(sys.argv[1]), sys.argv[2]
    os.makedirs(os.path.join(root, "buckets"), exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.store = Store(root)
    server.serve_forever()


if __name__ == "__main__":
    main()
