import sharp from 'sharp';

/** Real test images, made with sharp: a colour gradient, a mask, a line drawing. */
export async function gradientPng(width = 256, height = 256): Promise<Buffer> {
  const raw = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++)
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      raw[i] = Math.round((255 * x) / width);
      raw[i + 1] = Math.round((255 * y) / height);
      raw[i + 2] = 128;
    }
  return sharp(raw, { raw: { width, height, channels: 3 } }).png().toBuffer();
}

/** White square in the middle of a black image: the region inpainting repaints. */
export async function maskPng(width = 256, height = 256): Promise<Buffer> {
  const raw = Buffer.alloc(width * height);
  for (let y = height / 4; y < (3 * height) / 4; y++) for (let x = width / 4; x < (3 * width) / 4; x++) raw[y * width + x] = 255;
  return sharp(raw, { raw: { width, height, channels: 1 } }).png().toBuffer();
}

/** Bright shapes on black: an image with clear edges for canny. */
export async function shapesPng(width = 256, height = 256): Promise<Buffer> {
  const svg = `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}"><rect width="100%" height="100%" fill="black"/><circle cx="${width / 2}" cy="${height / 2}" r="${width / 4}" fill="white"/><rect x="10" y="10" width="40" height="40" fill="white"/></svg>`;
  return sharp(Buffer.from(svg)).png().toBuffer();
}

export const b64 = (buf: Buffer) => buf.toString('base64');
