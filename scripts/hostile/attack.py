#!/usr/bin/env python3
"""Hostile-input attacks against a running `videollava serve` (issue 13), stdlib only.

Usage: attack.py BASE_URL SERVER_PID ALLOWED_DIR [attack ...]
Each attack prints one JSON line: name, HTTP status, seconds, the server's VmRSS growth
(before -> after) and VmHWM growth (peak) in MB, the start of the error message, and whether
the server still answers /health afterwards. Inputs are generated here (nothing large on disk,
except the real video placed in ALLOWED_DIR for the playlist attacks).
"""
import base64, json, os, struct, sys, time, urllib.request, urllib.error, zlib


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return -1
    return -1


def post(base, body, timeout):
    data = json.dumps(body).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except Exception as e:  # timeout, reset
        return -1, f"{type(e).__name__}: {e}"


def health(base):
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:
        return f"{type(e).__name__}"


def chunk(kind, data):
    c = struct.pack(">I", len(data)) + kind + data
    return c + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width, height, bit_depth, color_type, channels):
    """A PNG of zeros, compressed row by row (a bomb when large)."""
    row = b"\0" + bytes(width * channels * bit_depth // 8)
    comp = zlib.compressobj(9)
    out = []
    for _ in range(height):
        out.append(comp.compress(row))
    out.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(out)) + chunk(b"IEND", b"")


def y4m(width, height, frames, fps="25:1"):
    head = f"YUV4MPEG2 W{width} H{height} F{fps} Ip A1:1 C420jpeg\n".encode()
    size = width * height + 2 * (((width + 1) // 2) * ((height + 1) // 2))
    frame = b"FRAME\n" + bytes([128]) * size
    return head + frame * frames


def uri(mime, data):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def body(parts, max_tokens=4, **extra):
    b = {"messages": [{"role": "user", "content": parts + [{"type": "text", "text": "describe"}]}], "max_tokens": max_tokens}
    b.update(extra)
    return b


def image(url):
    return {"type": "image_url", "image_url": {"url": url}}


def video(url):
    return {"type": "video_url", "video_url": {"url": url}}


def attacks(allowed):
    real = os.path.join(allowed, "secret.mp4")
    yield "y4m_2000000x1_frame", lambda: body([video(uri("video/x-yuv4mpeg", y4m(2_000_000, 1, 1)))])
    yield "png16_rgba_bomb_x4", lambda: body([image(uri("image/png", png(10000, 10000, 16, 6, 4)))] * 4)
    yield "hls_playlist_local_abs", lambda: body([video(uri("application/vnd.apple.mpegurl",
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\nfile://{real}\n#EXT-X-ENDLIST\n".encode()))])
    yield "hls_playlist_local_plain", lambda: body([video(uri("application/vnd.apple.mpegurl",
        f"#EXTM3U\n#EXTINF:1.0,\n{real}\n#EXT-X-ENDLIST\n".encode()))])
    yield "ffconcat_local", lambda: body([video(uri("text/plain", f"ffconcat version 1.0\nfile '{real}'\n".encode()))])
    yield "thin_png_16384x1_x16", lambda: body([image(uri("image/png", png(16384, 1, 8, 2, 3)))] * 16)
    yield "y4m_50000_frames_no_count", lambda: body([video(uri("video/x-yuv4mpeg", y4m(2, 2, 50_000)))])
    yield "y4m_50000_frames_1000fps", lambda: body([video(uri("video/x-yuv4mpeg", y4m(2, 2, 50_000, fps="1000:1")))])
    yield "y4m_fake_duration_2x1h", lambda: body([video(uri("video/x-yuv4mpeg", y4m(16, 16, 2, fps="1:3600")))])
    yield "media_over_context_16_images", lambda: body([image(uri("image/png", png(2000, 2000, 8, 2, 3)))] * 16)
    yield "stop_strings_16x1MB", lambda: body([], max_tokens=8, stop=["x" * (1 << 20)] * 16)


def main():
    base, pid, allowed = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    only = set(sys.argv[4:])
    timeout = float(os.environ.get("ATTACK_TIMEOUT", "120"))
    for name, make in attacks(allowed):
        if only and name not in only:
            continue
        b = make()
        rss0, hwm0 = status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM")
        t = time.time()
        code, text = post(base, b, timeout)
        dt = time.time() - t
        time.sleep(0.5)
        rss1, hwm1 = status_kb(pid, "VmRSS"), status_kb(pid, "VmHWM")
        try:
            msg = json.loads(text)["error"]["message"]
        except Exception:
            msg = text
        print(json.dumps({
            "attack": name, "status": code, "seconds": round(dt, 2),
            "rss_mb": [round(rss0 / 1024), round(rss1 / 1024)], "hwm_growth_mb": round((hwm1 - hwm0) / 1024) if hwm1 >= 0 else None,
            "alive": os.path.exists(f"/proc/{pid}"), "health": health(base), "message": msg[:300],
        }), flush=True)
        if not os.path.exists(f"/proc/{pid}"):
            print(json.dumps({"attack": name, "note": "server process is gone"}), flush=True)
            return


if __name__ == "__main__":
    main()
