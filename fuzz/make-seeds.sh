#!/usr/bin/env bash
# Build the fuzz targets' seed corpora in DIR (default fuzz/seeds): small images made by
# qemu-img/qemu-io with many options, disks with partition tables, filesystems and boot
# configurations for diskboot, well-formed virtqueues for virtio_blk, and NBD client
# sessions (handshakes and requests) for nbd_server. Seeds over AFL's 1 MiB input limit
# are dropped. Nothing here is committed: it is rebuilt each run.
set -euo pipefail

out="$(realpath -m "${1:-$(dirname "$0")/seeds}")"
rm -rf "$out"
mkdir -p "$out"/{open_read,check,qcow2_parts,diskboot,virtio_blk,nbd_server}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

n=0
# qcow2 NAME OPTIONS [qemu-io commands...]: an image of 2 MiB with some data written.
qcow2() {
    local name=$1 opts=$2
    shift 2
    qemu-img create -q -f qcow2 -o "$opts" "$name.qcow2" 2M
    qemu-io -f qcow2 -c "write -P 0xa5 0 64k" -c "write -z 256k 64k" \
        -c "write -P 0x3c 1m 8k" "$@" "$name.qcow2" >/dev/null
    n=$((n + 1))
}

for cs in 512 1k 4k 64k 256k; do
    qcow2 "v3-$cs" "cluster_size=$cs"
    qcow2 "v2-$cs" "compat=0.10,cluster_size=$cs"
done
qcow2 ext-l2 "extended_l2=on,cluster_size=64k" -c "write -P 7 70k 2k"
qcow2 ext-l2-16k "extended_l2=on,cluster_size=16k" -c "write -P 7 5k 512"
qcow2 lazy "lazy_refcounts=on"
for rb in 1 2 4 8 16 32 64; do
    qcow2 "refcount-$rb" "refcount_bits=$rb,cluster_size=4k"
done
qemu-img create -q -f raw base.img 2M
mkdir -p sub && qemu-img create -q -f qcow2 sub/base.qcow2 2M
qcow2 backing "backing_file=base.img,backing_fmt=raw"
qcow2 backing-qcow2 "backing_file=sub/base.qcow2,backing_fmt=qcow2,cluster_size=4k"

# Compressed clusters, zlib and zstd.
qemu-img create -q -f raw data.raw 2M
qemu-io -f raw -c "write -P 0x11 0 128k" -c "write -P 0x22 512k 64k" data.raw >/dev/null
for ct in zlib zstd; do
    for cs in 4k 64k; do
        qemu-img convert -c -O qcow2 -o "compression_type=$ct,cluster_size=$cs" data.raw "comp-$ct-$cs.qcow2"
    done
done
qemu-img convert -c -O qcow2 -o compat=0.10,cluster_size=4k data.raw comp-v2.qcow2

# Snapshots.
qcow2 snap "cluster_size=4k"
qemu-img snapshot -c one snap.qcow2
qemu-io -f qcow2 -c "write -P 0x77 0 4k" snap.qcow2 >/dev/null
qemu-img snapshot -c two snap.qcow2
qcow2 snap-v2 "compat=0.10,cluster_size=4k"
qemu-img snapshot -c old snap-v2.qcow2

# Persistent bitmaps.
qcow2 bitmaps "cluster_size=4k"
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 64k bitmaps.qcow2 b1
qemu-img bitmap --add bitmaps.qcow2 b2
qemu-img bitmap --disable bitmaps.qcow2 b2
qemu-img convert -O qcow2 -o cluster_size=4k data.raw bitmaps-data.qcow2
qemu-img bitmap --add bitmaps-data.qcow2 dirty
qemu-io -f qcow2 -c "write 0 16k" bitmaps-data.qcow2 >/dev/null 2>&1 || true

# vpc and vdi.
for sub in dynamic fixed; do
    qemu-img convert -O vpc -o subformat=$sub data.raw "vpc-$sub.vhd"
done
qemu-img convert -O vpc -o subformat=dynamic,force_size=on data.raw vpc-force.vhd
qemu-img convert -O vdi data.raw vdi-dynamic.vdi
qemu-img convert -O vdi -o static=on data.raw vdi-static.vdi
qemu-img convert -O qed -o cluster_size=4k,table_size=2 data.raw qed-plain.qed
qemu-img create -q -f qed -b data.raw -F raw qed-backing.qed 2M
qemu-io -f qed -c "write -P 0x5a 64k 8k" -c "write -z 1m 64k" qed-backing.qed >/dev/null
qemu-img convert -O qcow data.raw qcow-plain.qcow
# qemu-img 10 exits 1 without a word after writing a compressed qcow; the image is whole.
qemu-img convert -c -O qcow data.raw qcow-compressed.qcow || true
qemu-img create -q -f qcow -b data.raw -F raw qcow-backing.qcow 2M
qemu-io -f qcow -c "write -P 0x5a 64k 8k" qcow-backing.qcow >/dev/null
qemu-img convert -O parallels -o cluster_size=4k data.raw parallels-4k.hds
cp data.raw raw.img

# vhdx: qemu-img's layout puts data at 8 MiB and more, past AFL's limit; these keep its
# headers and metadata but move the BAT (64 KiB) to 320 KiB and the metadata (128 KiB) to
# 384 KiB (the region table sealed again), for a 4 MiB disk whose blocks all read as zeroes.
vhdx_compact() { # vhdx_compact NAME OPTIONS
    qemu-img create -q -f vhdx -o "$2" "$1.full" 4M
    python3 - "$1.full" "$1.vhdx" <<'PY'
import struct, sys
def crc32c(b):
    c = 0xffffffff
    for x in b:
        c ^= x
        for _ in range(8):
            c = (c >> 1) ^ 0x82f63b78 if c & 1 else c >> 1
    return c ^ 0xffffffff
src = open(sys.argv[1], 'rb').read()
rt_at, bat, md = 192 << 10, 320 << 10, 384 << 10
rt = bytearray(src[rt_at:rt_at + 65536])
old_bat, = struct.unpack_from('<Q', rt, 32)
old_md, = struct.unpack_from('<Q', rt, 64)
struct.pack_into('<QI', rt, 32, bat, 64 << 10)
struct.pack_into('<QI', rt, 64, md, 128 << 10)
struct.pack_into('<I', rt, 4, 0)
struct.pack_into('<I', rt, 4, crc32c(bytes(rt)))
out = bytearray(src[:rt_at]) + rt + rt
out += b'\0' * (bat - len(out)) + src[old_bat:old_bat + (64 << 10)]
out += src[old_md:old_md + (64 << 10) + 64]
open(sys.argv[2], 'wb').write(out)
PY
    qemu-img check -q -f vhdx "$1.vhdx"
}
vhdx_compact vhdx-dynamic subformat=dynamic
vhdx_compact vhdx-not-zero block_state_zero=off

keep() { # keep TARGET PREFIX_BYTE FILE: a seed unless over 1 MiB
    local target=$1 byte=$2 file=$3
    [ "$(stat -c %s "$file")" -lt $((1 << 20)) ] || return 0
    { printf "\\x$(printf %02x "$byte")"; cat "$file"; } >"$out/$target/$(basename "$file").$byte"
}
keep_plain() {
    [ "$(stat -c %s "$2")" -lt $((1 << 20)) ] || return 0
    cp "$2" "$out/$1/$(basename "$2")"
}

for f in *.qcow2 *.vhd *.vdi *.vhdx *.qed *.qcow *.hds raw.img; do
    keep open_read 0 "$f"
done
for f in *.qcow2; do
    keep check 0 "$f"
    keep_plain qcow2_parts "$f"
done
for f in *.vdi; do keep check 1 "$f"; done
for f in *.qed; do keep check 2 "$f"; done
for f in *.hds; do keep check 3 "$f"; done
for f in *.vhd; do keep open_read 3 "$f"; done
for f in *.vdi; do keep open_read 4 "$f"; done
for f in *.vhdx; do keep open_read 5 "$f"; done
for f in *.qed; do keep open_read 6 "$f"; done
for f in *.qcow; do keep open_read 7 "$f"; done
for f in *.hds; do keep open_read 8 "$f"; done

# diskboot: GPT + ext2 with grub.cfg, MBR + ext2 with extlinux and BLS, MBR + FAT with
# systemd-boot entries, a bare FAT volume, a bare ext2 filesystem with /vmlinuz.
mkdir -p tree/boot/grub tree/boot/extlinux tree/loader/entries
printf 'MZ fake kernel' >tree/boot/vmlinuz-1
printf '070701' >tree/boot/initrd-1
cat >tree/boot/grub/grub.cfg <<'CFG'
set default=1
set root=(hd0,gpt1)
menuentry 'A' { linux /boot/vmlinuz-1 root=/dev/vda1 ro
 initrd /boot/initrd-1 }
submenu 'more' { menuentry 'B' { search --fs-uuid --set=root 5a1e0c2d-6b7f-4e3a-9d8c-1f2e3d4c5b6a
 linux ($root)/boot/vmlinuz-1 quiet $foo } }
CFG
cat >tree/boot/extlinux/extlinux.conf <<'CFG'
DEFAULT one
LABEL one
  MENU LABEL One
  KERNEL /boot/vmlinuz-1
  APPEND root=/dev/vda1
  INITRD /boot/initrd-1
CFG
cat >tree/loader/entries/a.conf <<'CFG'
title A
version 6.1.0
linux /boot/vmlinuz-1
initrd /boot/initrd-1
options root=UUID=5a1e0c2d-6b7f-4e3a-9d8c-1f2e3d4c5b6a ro
CFG
ext2() { # ext2 DISK OFFSET SIZE TREE
    mkfs.ext4 -q -F -t ext2 -b 1024 -N 32 -U 5a1e0c2d-6b7f-4e3a-9d8c-1f2e3d4c5b6a \
        -d "$4" -E offset="$2" "$1" "$3"
}
truncate -s 900k gpt.raw
sgdisk -q -n 1:64:0 gpt.raw >/dev/null
ext2 gpt.raw $((64 * 512)) 800k tree
truncate -s 900k mbr.raw
printf 'start=64, type=83, bootable\n' | sfdisk -q mbr.raw
ext2 mbr.raw $((64 * 512)) 800k tree
mkdir -p grubonly/boot/grub && cp tree/boot/grub/grub.cfg grubonly/boot/grub/ && cp tree/boot/vmlinuz-1 grubonly/boot/
truncate -s 600k bare-ext2.raw
mkdir -p fallback && cp tree/boot/vmlinuz-1 fallback/vmlinuz && cp tree/boot/initrd-1 fallback/initrd.img
ext2 bare-ext2.raw 0 600k fallback
truncate -s 900k grub-ext2.raw
ext2 grub-ext2.raw 0 900k grubonly
truncate -s 900k fat.raw
mkfs.vfat -F 12 fat.raw >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -s -i fat.raw tree/loader tree/boot ::/
truncate -s 900k mbr-fat.raw
printf 'start=64, type=ef\n' | sfdisk -q mbr-fat.raw
mkfs.vfat -F 12 --offset=64 mbr-fat.raw 400 >/dev/null
MTOOLS_SKIP_CHECK=1 mcopy -s -i mbr-fat.raw@@32768 tree/loader tree/boot ::/
for f in gpt.raw mbr.raw bare-ext2.raw grub-ext2.raw fat.raw mbr-fat.raw; do
    keep_plain diskboot "$f"
done

# virtio_blk: a queue of SIZE (2^byte0), features byte1, then guest RAM (descriptor table
# at 0, available ring at 0x4000, used ring at 0x5000), with IN, OUT, FLUSH, GET_ID,
# WRITE_ZEROES and DISCARD requests, direct and indirect.
python3 - "$out/virtio_blk" <<'PY'
import struct, sys
out = sys.argv[1]
NEXT, WRITE, INDIRECT = 1, 2, 4

def seed(name, qsize_log, features, chains, indirect=False):
    ram = bytearray(0x10000)
    data = 0x8000
    descs = []
    heads = []
    def buf(payload, length, writable):
        nonlocal data
        addr = data
        ram[addr:addr + len(payload)] = payload
        data += max(length, 1) + 16
        return (addr, length, WRITE if writable else 0)
    for kind, sector, length, payload in chains:
        hdr = buf(struct.pack("<IIQ", kind, 0, sector), 16, False)
        parts = [hdr]
        if kind in (1, 11, 13):
            parts.append(buf(payload, len(payload), False))
        elif length:
            parts.append(buf(b"", length, True))
        parts.append(buf(b"", 1, True))
        if indirect:
            table = data
            data += 16 * len(parts)
            for i, (a, l, f) in enumerate(parts):
                nf = f | (NEXT if i + 1 < len(parts) else 0)
                ram[table + 16 * i:table + 16 * i + 16] = struct.pack("<QIHH", a, l, nf, i + 1)
            heads.append(len(descs))
            descs.append((table, 16 * len(parts), INDIRECT, 0))
        else:
            heads.append(len(descs))
            for i, (a, l, f) in enumerate(parts):
                nf = f | (NEXT if i + 1 < len(parts) else 0)
                descs.append((a, l, nf, len(descs) + 1))
    for i, (a, l, f, nx) in enumerate(descs):
        ram[16 * i:16 * i + 16] = struct.pack("<QIHH", a, l, f, nx)
    ram[0x4000:0x4004] = struct.pack("<HH", 0, len(heads))
    for i, h in enumerate(heads):
        ram[0x4004 + 2 * i:0x4006 + 2 * i] = struct.pack("<H", h)
    end = max(data, 0x5000 + 8 * 16)
    with open(f"{out}/{name}", "wb") as f:
        f.write(bytes([qsize_log, features]) + bytes(ram[:end]))

wz = struct.pack("<QII", 8, 16, 0)
reqs = [(0, 0, 4096, b""), (1, 8, 0, b"\xab" * 1024), (4, 0, 0, b""), (8, 0, 20, b""),
        (13, 0, 0, wz), (11, 0, 0, wz)]
seed("direct", 4, 0, reqs)
seed("indirect", 4, 2, reqs, indirect=True)
seed("event-idx", 5, 1 | 2 | 8, reqs, indirect=True)
seed("read-only", 3, 4, reqs[:3])
PY
# nbd_server: byte 0 the export (bit 0 read-only, bit 1 qemu:allocation-depth, bit 2
# writethrough, bits 3-4 requests in flight 16/1/2/4, bit 5 a 64 KiB byte budget), then a client's side of a session: client flags, options (structured
# replies, meta contexts, list, info, go or export name, abort), requests of every command
# with and without flags, in range and past the 1 MiB end, and a disconnect.
python3 - "$out/nbd_server" <<'PY'
import struct, sys
out = sys.argv[1]
IHAVEOPT = 0x49484156454F5054
def opt(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data
def name(n=b""):
    return struct.pack(">I", len(n)) + n
def go(o=7, infos=(3,)):
    return opt(o, name() + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))
def meta(o, queries):
    return opt(o, name() + struct.pack(">I", len(queries)) + b"".join(name(q) for q in queries))
def req(cmd, off, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, cookie, off, length) + payload
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
M = 1 << 20
reqs = [
    req(READ, 0, 4096, cookie=1),
    req(WRITE, 4096, 512, cookie=2, payload=b"\xab" * 512),
    req(WRITE, 70000, 100, FUA, cookie=3, payload=b"\x11" * 100),
    req(READ, 60000, 9000, cookie=4),
    req(ZEROES, 128 << 10, 64 << 10, cookie=5),
    req(ZEROES, 300 << 10, 8192, NO_HOLE | FAST_ZERO, cookie=6),
    req(TRIM, 0, 16384, cookie=7),
    req(CACHE, 0, 65536, cookie=8),
    req(FLUSH, 0, 0, cookie=9),
    req(READ, M - 512, 1024, cookie=10),
    req(WRITE, M - 4, 8, cookie=11, payload=b"\x22" * 8),
    req(READ, 250 << 10, 20 << 10, cookie=12),
]
structured = [
    req(READ, 0, 65536, DF, cookie=20),
    req(READ, 200 << 10, 128 << 10, cookie=21),
    req(STATUS, 0, M, cookie=22),
    req(STATUS, 4096, 65536, REQ_ONE, cookie=23),
    req(STATUS, M - 1, 2, cookie=24),
]
disc = req(DISC, 0, 0, cookie=99)
flags = struct.pack(">I", 3)
seeds = {
    "go-simple": b"\x00" + flags + go() + b"".join(reqs) + disc,
    "go-structured": b"\x00" + flags + opt(8) + meta(10, [b"base:allocation"]) + go()
        + b"".join(reqs + structured) + disc,
    "depth-both": b"\x02" + flags + opt(8) + meta(9, []) + meta(9, [b"qemu:"])
        + meta(10, [b"base:allocation", b"qemu:allocation-depth"]) + go(7, (0, 1, 2, 3))
        + b"".join(structured) + disc,
    "export-name": b"\x04" + struct.pack(">I", 1) + opt(1) + b"".join(reqs),
    "list-info-abort": b"\x00" + flags + opt(3) + go(6, (1, 2)) + opt(5) + opt(99) + opt(2),
    "read-only": b"\x01" + flags + opt(8) + go() + b"".join(reqs) + disc,
    "pipelined-writes": b"\x00" + flags + go() + b"".join(
        req(WRITE, i * 8192, 512, cookie=100 + i, payload=bytes([i]) * 512) for i in range(40))
        + req(FLUSH, 0, 0, cookie=200) + disc,
    "one-at-a-time": b"\x08" + flags + opt(8) + meta(10, [b"base:allocation"]) + go()
        + b"".join(reqs + structured) + disc,
    "over-the-budget": b"\x30" + flags + opt(8) + go() + b"".join(
        req(WRITE, i * (40 << 10), 40 << 10, cookie=300 + i, payload=bytes([i + 1]) * (40 << 10))
        for i in range(3)) + req(READ, 0, 128 << 10, cookie=310) + disc,
}
for n, data in seeds.items():
    with open(f"{out}/{n}", "wb") as f:
        f.write(data)
PY
echo "seeds: $n qcow2 images; $(find "$out" -type f | wc -l) files, $(du -sh "$out" | cut -f1) in $out"
