//! `valenceclassify`: windowed speech valence classification as a pass-through audio filter.

use gst::glib;
use gst::prelude::*;

mod imp;

glib::wrapper! {
    pub struct ValenceClassify(ObjectSubclass<imp::ValenceClassify>)
        @extends gst_base::BaseTransform, gst::Element, gst::Object;
}

pub fn register(plugin: &gst::Plugin) -> Result<(), glib::BoolError> {
    gst::Element::register(
        Some(plugin),
        "valenceclassify",
        gst::Rank::NONE,
        ValenceClassify::static_type(),
    )
}
