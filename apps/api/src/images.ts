import { IMAGE_LIMITS, type ImageRefInput } from '@kiln/contracts';
import { FetchError, guardedRequest, KilnError, type Storage, targetPolicy } from '@kiln/runtime';
import sharp from 'sharp';

/**
 * Input images (img2img/inpaint sources, masks, control images) arrive as a URL, an S3 key or
 * base64. The API fetches each one, checks it is a PNG, JPEG or WebP that decodes completely
 * within the size limits — so a corrupt or oversized image is a 4xx here, never a worker crash
 * — and stores it under the job, so a retry never depends on the client's copy.
 */

export interface LoadedImage {
  bytes: Buffer;
  format: 'png' | 'jpeg' | 'webp';
  width: number;
  height: number;
}

export interface ImageSources {
  storage: Storage;
  allowPrivate: boolean;
  fetchTimeoutMs: number;
}

const bad = (field: string, rule: string, message: string, code: 'validation_failed' | 'payload_too_large' = 'validation_failed') =>
  new KilnError(code, `invalid request: ${field}: ${message}`, { details: [{ field, rule, message }] });

export async function loadImage(ref: ImageRefInput, field: string, src: ImageSources): Promise<LoadedImage> {
  let bytes: Buffer;
  if (ref.base64 !== undefined) {
    const b64 = ref.base64.replace(/^data:[^;,]+;base64,/, '').replace(/\s+/g, '');
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(b64)) throw bad(`${field}.base64`, 'invalid_base64', 'is not valid base64');
    bytes = Buffer.from(b64, 'base64');
    field = `${field}.base64`;
  } else if (ref.url !== undefined) {
    field = `${field}.url`;
    let res;
    try {
      res = await guardedRequest(ref.url, { maxBytes: IMAGE_LIMITS.maxBytes, timeoutMs: src.fetchTimeoutMs, maxRedirects: 3, allow: targetPolicy(src.allowPrivate) });
    } catch (err) {
      if (!(err instanceof FetchError)) throw err;
      if (err.category === 'too_large') throw bad(field, 'image_too_large', `the image is larger than ${IMAGE_LIMITS.maxBytes} bytes`, 'payload_too_large');
      // the message is the guard's category and words, never the socket's error (no port scanner)
      throw bad(field, err.category === 'private_address' ? 'private_address' : 'image_fetch_failed', `could not fetch the image (${err.message})`);
    }
    if (res.status !== 200) throw bad(field, 'image_fetch_failed', `could not fetch the image (http_status: the server answered HTTP ${res.status})`);
    bytes = res.body;
  } else {
    field = `${field}.s3_key`;
    let got: Buffer | null;
    try {
      got = await src.storage.getBuffer(ref.s3_key!, IMAGE_LIMITS.maxBytes);
    } catch (err) {
      if (err instanceof KilnError && err.code === 'payload_too_large') throw bad(field, 'image_too_large', err.message, 'payload_too_large');
      throw bad(field, 'image_fetch_failed', `could not read ${ref.s3_key}: ${err instanceof Error ? err.message : String(err)}`);
    }
    if (!got) throw bad(field, 'image_not_found', `no object ${ref.s3_key} in the bucket`);
    bytes = got;
  }
  if (bytes.length > IMAGE_LIMITS.maxBytes) throw bad(field, 'image_too_large', `the image is larger than ${IMAGE_LIMITS.maxBytes} bytes`, 'payload_too_large');
  if (bytes.length === 0) throw bad(field, 'image_unreadable', 'the image is empty');
  return decode(bytes, field);
}

async function decode(bytes: Buffer, field: string): Promise<LoadedImage> {
  let meta: Awaited<ReturnType<ReturnType<typeof sharp>['metadata']>>;
  try {
    // the header only, with no pixel limit: dimensions too large are a 413 (below), not "unreadable"
    meta = await sharp(bytes, { limitInputPixels: false }).metadata();
  } catch (err) {
    throw bad(field, 'image_unreadable', `not a readable image (${err instanceof Error ? err.message : String(err)})`);
  }
  const format = meta.format as string;
  if (format !== 'png' && format !== 'jpeg' && format !== 'webp') throw bad(field, 'image_format', `must be PNG, JPEG or WebP (got ${meta.format ?? 'unknown'})`);
  const width = meta.width ?? 0;
  const height = meta.height ?? 0;
  if (width > IMAGE_LIMITS.maxSide || height > IMAGE_LIMITS.maxSide)
    throw bad(field, 'image_too_large', `${width}×${height} exceeds ${IMAGE_LIMITS.maxSide} pixels on a side`, 'payload_too_large');
  try {
    // decode every pixel: a truncated or corrupt file fails here, not in a worker
    await sharp(bytes, { failOn: 'truncated', limitInputPixels: IMAGE_LIMITS.maxPixels }).raw().toBuffer();
  } catch (err) {
    throw bad(field, 'image_unreadable', `the image is corrupt or truncated (${err instanceof Error ? err.message : String(err)})`);
  }
  return { bytes, format, width, height };
}

const EXT = { png: 'png', jpeg: 'jpg', webp: 'webp' } as const;

type Slots<R> = { field: string; get: (r: R) => ImageRefInput | undefined; set: (r: R, key: string) => void; name: string }[];

/**
 * Loads and validates every input image of a parsed request; with `store`, uploads each to
 * `inputs/<jobId>/<slot>.<ext>` and returns the request with `{ s3_key }` references.
 */
export async function ingestImages<R extends { image?: { init: ImageRefInput; mask?: ImageRefInput }; controlnets?: { image: ImageRefInput }[] }>(
  request: R,
  jobId: string,
  src: ImageSources,
  store: boolean,
): Promise<R> {
  const out = structuredClone(request);
  const slots: Slots<R> = [];
  if (out.image) {
    slots.push({ field: 'image.init', name: 'init', get: (r) => r.image?.init, set: (r, key) => (r.image!.init = { s3_key: key }) });
    if (out.image.mask) slots.push({ field: 'image.mask', name: 'mask', get: (r) => r.image?.mask, set: (r, key) => (r.image!.mask = { s3_key: key }) });
  }
  out.controlnets?.forEach((_, i) =>
    slots.push({ field: `controlnets.${i}.image`, name: `control-${i}`, get: (r) => r.controlnets?.[i]?.image, set: (r, key) => (r.controlnets![i]!.image = { s3_key: key }) }),
  );
  const loaded = await Promise.all(slots.map(async (s) => ({ slot: s, img: await loadImage(s.get(out)!, s.field, src) })));
  const init = loaded.find((l) => l.slot.name === 'init')?.img;
  const mask = loaded.find((l) => l.slot.name === 'mask')?.img;
  if (init && mask && (init.width !== mask.width || init.height !== mask.height))
    throw bad('image.mask', 'mask_size_mismatch', `the mask is ${mask.width}×${mask.height}, the init image ${init.width}×${init.height}; they must match`);
  if (store) {
    for (const { slot, img } of loaded) {
      const key = `inputs/${jobId}/${slot.name}.${EXT[img.format]}`;
      await src.storage.putBuffer(key, img.bytes, `image/${img.format}`);
      slot.set(out, key);
    }
  }
  return out;
}
